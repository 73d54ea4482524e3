"""Exact factored task arithmetic + truncated SVD vs peft's ``svd`` combination, Llama-3-8B shapes.

For each sampled module kind, ``T`` random LoRA adapters (rank ``r``, scale ``alpha / r``) are
merged as ``Delta = sum_t w_t s_t B_t A_t`` and truncated to rank ``R``:

* **ours** (:mod:`geometry.merging`): concatenate the factors (rank ``T r``) and take the factored
  SVD (QR of ``B`` and ``A^T``, ``T r x T r`` core in float64) — :func:`truncate_factored`;
* **peft**: ``LoraModel._svd_generalized_task_arithmetic_weighted_adapter`` (the per-module body of
  ``add_weighted_adapter(..., combination_type="svd")``), called directly on one ``peft`` LoRA
  ``Linear`` layer holding the ``T`` adapters: it builds each ``m x n`` delta weight, sums them and
  runs ``torch.linalg.svd`` with peft's default ``full_matrices=True``. Building a full Llama-3-8B
  peft model (16 GB of base weights) is not needed to time that routine, so only the layer is built.

Both run in this process, one after the other, on the same factors. Printed per module: seconds of
each, the ratio peft / ours, and each result's relative Frobenius error against the exact dense sum
(float64), next to the optimal error ``sqrt(1 - energy kept)`` of a rank-``R`` truncation. The last
line is JSON.

    .venv/bin/python -m bench.merge_bench                      # v and q (about 2 minutes on 1 CPU thread)
    .venv/bin/python -m bench.merge_bench --modules q,k,v,o,gate,up,down --tasks 4 --r 16 --rank 16

The dense full SVD of a 14336 x 4096 ``gate`` / ``up`` / ``down`` module takes many minutes on one CPU
thread: ask for them explicitly (or run with a GPU: ``--device cuda``).

**LoRA-native methods** (``--native``, on by default for ``--native-modules v``): TSV-M, Iso-C,
Iso-CTS, KnOTS-TIES and Core-Space-TIES as :mod:`geometry.merging` computes them (from the factors:
QR of the stacked factors, ``T r``-sized cores, no ``m x n`` matrix) against their dense formulations
(:mod:`bench.dense_merges`: build each ``m x n`` task vector, thin SVDs of ``m x n`` / ``m x T n``
matrices, as FusionBench does on dense weights). Each (method, formulation) runs in a fresh child
process after a warm-up merge of tiny modules (imports, LAPACK): its peak memory is the peak
resident size during the merge (``VmHWM``, reset just before it) minus the resident size just before
it (the inputs, torch and the interpreter are excluded). The dense child also runs
the factored merge afterwards (untimed) and reports the relative Frobenius difference of the two
results. Printed: seconds and peak MB of each, the ratios dense / factored, the difference.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from geometry.merging.truncate import truncate_factored
from geometry.testing import LLAMA3_8B_SHAPES, random_factors

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peft_layer(factors, m: int, n: int, r: int, alpha: float, device: torch.device):
    """A peft LoRA ``Linear`` on an ``nn.Linear(n, m)`` holding adapters ``a0 .. a{T-1}`` with our factors."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=["x"])
    base = torch.nn.Linear(n, m, bias=False, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LoraLinear(base, "a0", config, r=r, lora_alpha=alpha, init_lora_weights=False)
        for t in range(1, len(factors)):
            layer.update_layer(f"a{t}", r, lora_alpha=alpha, config=config, init_lora_weights=False)
    with torch.no_grad():
        for t, (B, A) in enumerate(factors):
            layer.lora_A[f"a{t}"].weight.copy_(A)
            layer.lora_B[f"a{t}"].weight.copy_(B)
    return layer


def bench_module(kind: str, m: int, n: int, tasks: int, r: int, rank: int, seed: int, device: torch.device) -> dict:
    from peft.tuners.lora.model import LoraModel

    alpha = 2.0 * r
    scale = alpha / r
    weights = [1.0 / tasks] * tasks
    gen = torch.Generator().manual_seed(seed)
    factors = [tuple(x.to(device) for x in random_factors(m, n, r, seed=gen, dtype=torch.float32)) for _ in range(tasks)]

    exact = torch.zeros(m, n, dtype=torch.float64, device=device)  # reference only, not timed
    for w, (B, A) in zip(weights, factors):
        exact += (w * scale) * (B.double() @ A.double())
    norm = float(exact.norm())

    _sync(device)
    t0 = time.perf_counter()
    Bc = torch.cat([(w * scale) * B for w, (B, _) in zip(weights, factors)], dim=1)
    Ac = torch.cat([A for _, A in factors], dim=0)
    Bo, Ao, kept = truncate_factored(Bc, Ac, rank, device=device)
    _sync(device)
    ours_s = time.perf_counter() - t0
    err_ours = float((Bo @ Ao - exact).norm()) / norm

    layer = peft_layer([(B, A) for B, A in factors], m, n, r, alpha, device)
    names = [f"a{t}" for t in range(tasks)]
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        A_p, B_p = LoraModel._svd_generalized_task_arithmetic_weighted_adapter(
            None, "svd", names, weights, rank, layer, None, None, None, "total", None, full_matrices=True, driver=None
        )
    _sync(device)
    peft_s = time.perf_counter() - t0
    err_peft = float((B_p.double() @ A_p.double() - exact).norm()) / norm
    return {
        "kind": kind, "m": m, "n": n, "tasks": tasks, "r": r, "rank": rank,
        "ours_s": ours_s, "peft_s": peft_s, "ratio": peft_s / ours_s,
        "err_ours": err_ours, "err_peft": err_peft, "err_optimal": math.sqrt(max(0.0, 1.0 - kept)),
        "energy_kept": kept,
    }


#: the LoRA-native methods timed by ``--native`` (Core Space and KnOTS with their TIES default, keep 20%)
NATIVE_METHODS = ("tsv_m", "iso_c", "iso_cts", "knots", "core_space")


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status``, in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the peak resident size (``VmHWM``) to the current one (Linux: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _native_inputs(kind: str, tasks: int, r: int, seed: int, shape: tuple[int, int] | None = None):
    """``tasks`` synthetic adapters holding one Llama-3-8B module of ``kind`` (or ``shape``; float32, scale 2)."""
    from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey

    m, n = shape or LLAMA3_8B_SHAPES[kind]
    gen = torch.Generator().manual_seed(seed)
    key = ModuleKey("model", 0, kind)
    adapters = []
    for t in range(tasks):
        B, A = random_factors(m, n, r, seed=gen, dtype=torch.float32)
        mod = LoraModule(name=f"model.layers.0.self_attn.{kind}_proj", key=key, A=A, B=B, r=r, alpha=2.0 * r, scale=2.0)
        config = AdapterConfig(r=r, lora_alpha=2.0 * r, target_modules=[f"{kind}_proj"], base_model_name_or_path="bench")
        adapters.append(Adapter(name=f"t{t}", config=config, modules={key: mod}, source="bench", content_hash=f"b{t}"))
    return adapters, key


def _dense_merge(method: str, adapters, key) -> torch.Tensor:
    from bench import dense_merges

    mods = [a.modules[key] for a in adapters]
    Bs = [mod.B.double() for mod in mods]
    As = [mod.A.double() for mod in mods]
    w = torch.ones(len(mods), dtype=torch.float64)
    if method == "core_space":
        return dense_merges.core_space_ties(Bs, As, [mod.scale for mod in mods], w)
    taus = [mod.scale * (B @ A) for mod, B, A in zip(mods, Bs, As)]
    if method == "knots":
        return dense_merges.knots_ties(taus, w)
    return getattr(dense_merges, method)(taus)


def native_case(method: str, form: str, kind: str, tasks: int, r: int, seed: int) -> dict:
    """One (method, formulation) run, meant for a fresh process: seconds, peak MB above the inputs."""
    from geometry.merging import merge

    small, small_key = _native_inputs(kind, 2, 2, seed, shape=(64, 48))  # warm-up: imports, LAPACK paths
    merge(small, method, dtype=torch.float64, device="cpu")
    _dense_merge(method, small, small_key)
    adapters, key = _native_inputs(kind, tasks, r, seed)
    before = _status_mb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if form == "factored":
        out = merge(adapters, method, dtype=torch.float64, device="cpu").modules[key]
        seconds = time.perf_counter() - t0
    else:
        out = _dense_merge(method, adapters, key)
        seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM") - before
    row = {"method": method, "form": form, "seconds": seconds, "peak_mb": max(peak, 0.0)}
    if form == "dense":  # untimed: the factored result against this one
        factored = merge(adapters, method, dtype=torch.float64, device="cpu").modules[key].dense()
        row["rel_diff"] = float((factored - out).norm() / out.norm())
    return row


def _native_child(method: str, form: str, kind: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.merge_bench", "--_native-case", f"{method}:{form}:{kind}", "--tasks", str(args.tasks),
           "--r", str(args.r), "--seed", str(args.seed), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_native(kinds: list[str], args) -> list[dict]:
    rows = []
    print(f"\nLoRA-native merges, factored vs dense formulation ({args.tasks} tasks, r = {args.r}, "
          f"{args.threads} thread(s), each run in its own process)")
    print(f"{'method':>11} {'kind':>5} {'m x n':>11} {'factored s':>11} {'dense s':>9} {'time x':>7} "
          f"{'factored MB':>12} {'dense MB':>9} {'memory x':>9} {'rel diff':>9}")
    for kind in kinds:
        m, n = LLAMA3_8B_SHAPES[kind]
        for method in NATIVE_METHODS:
            fac = _native_child(method, "factored", kind, args)
            den = _native_child(method, "dense", kind, args)
            row = {"method": method, "kind": kind, "shape": [m, n], "factored_s": fac["seconds"],
                   "dense_s": den["seconds"], "time_ratio": den["seconds"] / fac["seconds"],
                   "factored_mb": fac["peak_mb"], "dense_mb": den["peak_mb"],
                   "memory_ratio": den["peak_mb"] / max(fac["peak_mb"], 1.0), "rel_diff": den["rel_diff"]}
            rows.append(row)
            print(f"{method:>11} {kind:>5} {f'{m}x{n}':>11} {row['factored_s']:11.3f} {row['dense_s']:9.2f} "
                  f"{row['time_ratio']:7.0f} {row['factored_mb']:12.1f} {row['dense_mb']:9.0f} "
                  f"{row['memory_ratio']:9.1f} {row['rel_diff']:9.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default="v,q", help=f"kinds among {','.join(LLAMA3_8B_SHAPES)} (default v,q)")
    parser.add_argument("--tasks", type=int, default=4, help="adapters merged (default 4)")
    parser.add_argument("--r", type=int, default=16, help="rank of each adapter (default 16)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the merged adapter (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--native-modules", default="v",
                        help="kinds for the LoRA-native comparison (default v; empty to skip it)")
    parser.add_argument("--_native-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._native_case:  # a child of bench_native: one run, one JSON line
        method, form, kind = args._native_case.split(":")
        print(json.dumps(native_case(method, form, kind, args.tasks, args.r, args.seed)))
        return 0
    device = torch.device(args.device)
    kinds = [k.strip() for k in args.modules.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in LLAMA3_8B_SHAPES]
    if unknown:
        print(f"error: unknown module kinds {unknown}; choose among {list(LLAMA3_8B_SHAPES)}", file=sys.stderr)
        return 2
    rows = []
    print(f"{'kind':>5} {'m x n':>12} {'ours s':>9} {'peft s':>9} {'ratio':>8} {'err ours':>10} {'err peft':>10} {'optimal':>10}")
    for i, kind in enumerate(kinds):
        m, n = LLAMA3_8B_SHAPES[kind]
        row = bench_module(kind, m, n, args.tasks, args.r, args.rank, args.seed + i, device)
        rows.append(row)
        print(f"{kind:>5} {f'{m}x{n}':>12} {row['ours_s']:9.4f} {row['peft_s']:9.2f} {row['ratio']:8.0f} "
              f"{row['err_ours']:10.3e} {row['err_peft']:10.3e} {row['err_optimal']:10.3e}", flush=True)
    ours, peft = sum(r["ours_s"] for r in rows), sum(r["peft_s"] for r in rows)
    native_kinds = [k.strip() for k in args.native_modules.split(",") if k.strip()]
    native = bench_native(native_kinds, args) if native_kinds else []
    print(json.dumps({"bench": "merge_svd", "device": str(device), "threads": args.threads, "tasks": args.tasks,
                      "r": args.r, "rank": args.rank, "ours_s": ours, "peft_s": peft, "ratio": peft / ours,
                      "modules": rows, "native": native}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
