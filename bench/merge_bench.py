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

    .venv/bin/python bench/merge_bench.py                      # v and q (about 2 minutes on 1 CPU thread)
    .venv/bin/python bench/merge_bench.py --modules q,k,v,o,gate,up,down --tasks 4 --r 16 --rank 16

The dense full SVD of a 14336 x 4096 ``gate`` / ``up`` / ``down`` module takes many minutes on one CPU
thread: ask for them explicitly (or run with a GPU: ``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic import LLAMA3_8B_SHAPES, random_factors  # noqa: E402
from geometry.merging.truncate import truncate_factored  # noqa: E402


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default="v,q", help=f"kinds among {','.join(LLAMA3_8B_SHAPES)} (default v,q)")
    parser.add_argument("--tasks", type=int, default=4, help="adapters merged (default 4)")
    parser.add_argument("--r", type=int, default=16, help="rank of each adapter (default 16)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the merged adapter (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
    print(json.dumps({"bench": "merge_svd", "device": str(device), "threads": args.threads, "tasks": args.tasks,
                      "r": args.r, "rank": args.rank, "ours_s": ours, "peft_s": peft, "ratio": peft / ours,
                      "modules": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
