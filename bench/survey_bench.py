"""Survey benchmark: 200 Llama-3.2-1B-shaped r = 16 adapters surveyed out of core, then on a LocalCluster.

    .venv/bin/python bench/survey_bench.py                       # the issue's workload (16 layers: long on 2 cores)
    .venv/bin/python bench/survey_bench.py --layers 2            # the same adapters, 2 of their 16 layers
    .venv/bin/python bench/survey_bench.py --quick               # smoke run (tiny, no timing claims)

Workload: ``--adapters`` (200) synthetic adapters of a Llama-3.2-1B shape (hidden 2048, intermediate
8192, 32 heads, 8 KV heads: k / v out 512; ``--layers`` of its 16 blocks), r = 16, all seven
projections (q, k, v, o, gate, up, down), random float32 factors written as peft folders
(``adapter_model.safetensors``) in a fresh temporary folder, deleted at the end (``--keep`` keeps it).

1. **Out of core, one process**: ``python -m geometry survey``'s engine (``geometry.survey.run_survey``,
   in-process runner, ``--memory-limit`` GB) in a child process, on the first ``--small`` (50)
   adapters and then on all of them. Its peak resident memory (``ru_maxrss`` of the child: reading,
   Gram products, pair algebra, Parquet writing) is printed, with the time per adapter pair (all
   modules) and per pair-module, and how the time grows from ``--small`` to ``--adapters``:
   ``growth_vs_n2 = (t_N / t_small) / (N / small)^2`` (1.0: exactly quadratic; below 1: the O(N)
   and O(N^2 d) parts are cheaper than the O(N^2) pair algebra).
2. **Dask**: a ``LocalCluster`` with 1 worker (all cores' torch threads) and then 2 workers (the cores
   shared), the same survey on ``--speedup-adapters`` adapters (default: all); cluster start-up not
   timed. ``speedup_2_workers = t_1 / t_2``. The workers' peak memory is printed too.

The last line is one JSON object: ``peak_rss_gb``, ``seconds_per_pair``, ``seconds_per_pair_module``,
``growth_vs_n2``, ``speedup_2_workers``, the timings, and a projection for 1,000 Llama-3-8B adapters
from the measured figures (pair algebra: measured seconds per pair-module; Gram products: measured
float32 GEMM throughput).

On the 2-core development machine (shared with other jobs) ``--layers 2 --speedup-adapters 100`` took
about 9 minutes (the 200-adapter survey 139 s); the default (16 layers) is about 8x longer per survey
and about an hour in all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from geometry.testing import LLAMA3_8B_SHAPES

#: ``kind -> (out_features, in_features)`` of one Llama-3.2-1B block (GQA: 8 KV heads of 64).
LLAMA32_1B_SHAPES: dict[str, tuple[int, int]] = {
    "q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048),
    "gate": (8192, 2048), "up": (8192, 2048), "down": (2048, 8192),
}
LLAMA32_1B_LAYERS = 16
_PARENT = {"gate": "mlp", "up": "mlp", "down": "mlp"}


def write_adapters(root: Path, n: int, layers: int, r: int, shapes: dict[str, tuple[int, int]]) -> float:
    """``n`` peft folders of random float32 factors under ``root``; returns the GB written."""
    from safetensors.torch import save_file

    total = 0
    for k in range(n):
        gen = torch.Generator().manual_seed(1000 + k)
        tensors = {}
        for layer in range(layers):
            for kind, (m, nn) in shapes.items():
                name = f"base_model.model.model.layers.{layer}.{_PARENT.get(kind, 'self_attn')}.{kind}_proj"
                tensors[f"{name}.lora_A.weight"] = torch.randn(r, nn, generator=gen) / nn**0.5
                tensors[f"{name}.lora_B.weight"] = torch.randn(m, r, generator=gen) / m**0.5
        folder = root / f"adapter{k:04d}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "task_type": "CAUSAL_LM",
            "target_modules": [f"{kd}_proj" for kd in shapes], "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        }))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        total += sum(t.numel() * 4 for t in tensors.values())
    return total / 1e9


def child(listing: str, out: str, memory_gb: float) -> None:
    """Run one in-process survey and print ``{"seconds", "peak_rss_bytes", "modules"}`` (a child process)."""
    from geometry.survey import SurveySettings, run_survey, scan

    refs = scan(listing)
    t0 = time.perf_counter()
    survey = run_survey(refs, out, settings=SurveySettings(memory_gb=memory_gb))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "modules": len(survey.modules())}))


def run_child(paths: list[Path], work: Path, tag: str, memory_gb: float) -> dict:
    listing = work / f"{tag}.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    cmd = [sys.executable, __file__, "--child", str(listing), str(work / f"{tag}.parquet"), str(memory_gb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child survey failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dask_run(paths: list[Path], work: Path, workers: int, memory_gb: float) -> dict:
    from geometry.survey import SurveySettings, run_survey, scan
    from geometry.survey.cluster import dask_runner, start_client, warm, worker_peak_rss

    refs = scan(paths)
    client = start_client(workers=workers, memory_gb=memory_gb)
    try:
        client.wait_for_workers(workers, timeout=120)
        warm(client)
        t0 = time.perf_counter()
        run_survey(refs, work / f"dask{workers}.parquet", settings=SurveySettings(memory_gb=memory_gb),
                   runner=dask_runner(client))
        seconds = time.perf_counter() - t0
        peaks = worker_peak_rss(client)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    return {"seconds": seconds, "worker_peak_rss_bytes": max(peaks.values())}


def gemm_gflops(threads: int, rows: int = 8192, cols: int = 3200) -> float:
    """Measured float32 Gram-product throughput (``M^T M`` for ``M (rows, cols)``), GFLOP/s."""
    torch.set_num_threads(threads)
    M = torch.randn(rows, cols)
    M.mT @ M
    t0 = time.perf_counter()
    for _ in range(3):
        M.mT @ M
    dt = (time.perf_counter() - t0) / 3
    return 2 * rows * cols**2 / dt / 1e9


def projection(sec_pair_module: float, gflops: float, n: int = 1000, r: int = 16, layers: int = 32,
               memory_gb: float = 4.0) -> dict:
    """Cost of surveying ``n`` Llama-3-8B adapters from the measured figures (one machine like this one)."""
    from geometry.survey import plan_blocks

    modules = layers * len(LLAMA3_8B_SHAPES)
    pairs = n * (n - 1) // 2
    algebra = sec_pair_module * pairs * modules
    gram_flops, blocks = 0.0, {}
    for kind, (m, k) in LLAMA3_8B_SHAPES.items():
        block, _ = plan_blocks(n, r, (m, k), memory_gb)
        blocks[kind] = block
        nb = -(-n // block)
        per_row = (n * r) ** 2 if nb == 1 else nb * (nb + 1) / 2 * (2 * block * r) ** 2  # Gram per block pair
        gram_flops += 2 * per_row * (m + k) * layers
    gram = gram_flops / (gflops * 1e9)
    factors_gb = n * layers * sum((m + k) * r * 4 for m, k in LLAMA3_8B_SHAPES.values()) / 1e9
    return {"adapters": n, "modules": modules, "pairs": pairs, "factors_gb": round(factors_gb, 1),
            "pair_algebra_core_hours": round(algebra / 3600, 1), "gram_hours": round(gram / 3600, 2),
            "blocks_at_memory_limit": blocks, "memory_gb": memory_gb,
            "hours_this_machine": round((algebra + gram) / 3600, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--small", type=int, default=50, help="the smaller survey for the growth ratio (default 50)")
    p.add_argument("--layers", type=int, default=LLAMA32_1B_LAYERS, help="blocks per adapter (default 16, all)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--memory-limit", type=float, default=4.0, help="GB for the out-of-core run (default 4)")
    p.add_argument("--speedup-adapters", type=int, default=None, help="adapters for the 1 vs 2 workers runs (all)")
    p.add_argument("--no-dask", action="store_true")
    p.add_argument("--dir", default=None, help="where to write the adapters (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the adapters and results")
    p.add_argument("--quick", action="store_true", help="tiny: 12 adapters, 1 layer, small shapes (no timing claims)")
    p.add_argument("--child", nargs=3, metavar=("LIST", "OUT", "GB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], float(args.child[2]))
        return
    shapes = LLAMA32_1B_SHAPES
    if args.quick:
        args.adapters, args.small, args.layers = 12, 6, 1
        shapes = {k: (max(8, m // 32), max(8, n // 32)) for k, (m, n) in shapes.items()}
    work = Path(tempfile.mkdtemp(prefix="survey_bench_", dir=args.dir))
    cores = len(os.sched_getaffinity(0))
    print(f"cores {cores}, load average {os.getloadavg()[0]:.2f}; {args.adapters} adapters x {args.layers} layers x "
          f"{len(shapes)} projections, r = {args.rank}, float32, in {work}", flush=True)
    try:
        t0 = time.perf_counter()
        gb = write_adapters(work / "adapters", args.adapters, args.layers, args.rank, shapes)
        print(f"wrote {gb:.2f} GB of factors in {time.perf_counter() - t0:.1f} s", flush=True)
        paths = sorted((work / "adapters").iterdir())
        modules = args.layers * len(shapes)
        small = run_child(paths[: args.small], work, "small", args.memory_limit)
        print(f"out of core, {args.small} adapters: {small['seconds']:.1f} s, peak RSS "
              f"{small['peak_rss_bytes'] / 2**30:.2f} GB", flush=True)
        big = run_child(paths, work, "big", args.memory_limit)
        n, pairs = args.adapters, args.adapters * (args.adapters - 1) // 2
        sec_pair = big["seconds"] / pairs
        sec_pair_module = sec_pair / modules
        growth = (big["seconds"] / small["seconds"]) / (args.adapters / args.small) ** 2
        print(f"out of core, {n} adapters: {big['seconds']:.1f} s, peak RSS {big['peak_rss_bytes'] / 2**30:.2f} GB "
              f"(limit {args.memory_limit:g} GB), {sec_pair * 1e3:.2f} ms per adapter pair "
              f"({sec_pair_module * 1e6:.0f} us per pair-module, {modules} modules)", flush=True)
        print(f"growth {args.small} -> {n}: time x{big['seconds'] / small['seconds']:.1f} for N^2 x"
              f"{(n / args.small) ** 2:.0f}: growth_vs_n2 = {growth:.2f}", flush=True)
        result = {
            "adapters": n, "layers": args.layers, "modules": modules, "rank": args.rank, "factors_gb": round(gb, 2),
            "peak_rss_gb": round(big["peak_rss_bytes"] / 2**30, 3), "memory_limit_gb": args.memory_limit,
            "seconds": round(big["seconds"], 2), "seconds_small": round(small["seconds"], 2),
            "seconds_per_pair": sec_pair, "seconds_per_pair_module": sec_pair_module,
            "growth_vs_n2": round(growth, 3),
        }
        if not args.no_dask:
            m = args.speedup_adapters or n
            one = dask_run(paths[:m], work, 1, args.memory_limit)
            two = dask_run(paths[:m], work, 2, args.memory_limit)
            speedup = one["seconds"] / two["seconds"]
            peak_w = max(one["worker_peak_rss_bytes"], two["worker_peak_rss_bytes"]) / 2**30
            print(f"dask LocalCluster, {m} adapters: 1 worker {one['seconds']:.1f} s, 2 workers "
                  f"{two['seconds']:.1f} s: speed-up x{speedup:.2f}; worker peak RSS {peak_w:.2f} GB", flush=True)
            result.update(speedup_2_workers=round(speedup, 3), dask_adapters=m,
                          dask_1_worker_s=round(one["seconds"], 2), dask_2_workers_s=round(two["seconds"], 2),
                          dask_worker_peak_rss_gb=round(peak_w, 3))
        gflops = gemm_gflops(cores, *((1024, 800) if args.quick else (8192, 3200)))
        proj = projection(sec_pair_module, gflops, memory_gb=args.memory_limit)
        print(f"projection, 1,000 Llama-3-8B r = 16 adapters ({proj['factors_gb']} GB of factors): pair algebra "
              f"{proj['pair_algebra_core_hours']} h at the measured {sec_pair_module * 1e6:.0f} us per pair-module, "
              f"Gram products {proj['gram_hours']} h at the measured {gflops:.0f} GFLOP/s", flush=True)
        result.update(gemm_gflops=round(gflops, 1), projection_1000_llama3_8b=proj,
                      load_average_end=round(os.getloadavg()[0], 2))
        print(json.dumps(result))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
