"""Factored distances vs a careful dense baseline and the QR-of-B shortcut, on 8 Llama-3-8B-shaped LoRA adapters.

    .venv/bin/python bench/geometry_bench.py                     # full workload, 2 torch threads
    .venv/bin/python bench/geometry_bench.py --dense-adapters 8  # every dense SVD and pair for real (long)
    .venv/bin/python bench/geometry_bench.py --quick             # tiny shapes (smoke test, no timing claims)

Workload: 8 adapters x 32 layers x {q 4096x4096, k 1024x4096, v 1024x4096, o 4096x4096,
gate 14336x4096, up 14336x4096, down 4096x14336} = 224 modules, r = 16, float32 factors
(``geometry.testing``, seeded); all 28 pairs, metrics l2 / cosine / grassmann, factors ba / a / b.

* **factored**: ``geometry.analysis.distances.all_distances`` over the whole workload, timed for real (all
  metrics x factors; then Grassmann only; then each distinct module shape alone).
* **dense, cached SVD** (what a careful researcher writes without the factored maths): per adapter
  and module, the dense task vector ``tau = s B A`` (float64) and ONE thin SVD of it (basis
  ``U[:, :rank]``), plus the thin SVDs of ``B`` and ``A^T``, cached across pairs; per pair, L2 and
  cosine on the dense ``tau`` / ``B`` / ``A``, and Grassmann from the cached bases (sine-based
  principal angles). Timed for real on one module per distinct shape (q/o, k/v, gate/up, down):
  the per-adapter step on ``--dense-adapters`` adapters (default 1; their mean) and the per-pair
  step on pair (0, 1), then counted: ``(8 x per-adapter + 28 x per-pair) x modules of that shape``.
  With ``--dense-adapters 1`` the pair step uses adapter 1's basis from the QR of its ``B``
  (the same subspace; its SVD is not re-timed): the pair step's operations are the same.
  That count is the only extrapolation (no cost model); ``--dense-adapters 8`` measures every SVD
  and every pair of the module.
* **QR-of-B shortcut** (the paper's identity ``Im(BA) = Im(B)`` for full-row-rank ``A``): per
  adapter and module ``Q = qr(B)`` and ``qr(A^T)`` (float64 Householder, batched over layers,
  one thread as in the factored engine, cached), per pair the principal angles; gives Grassmann
  on ``ba`` (= ``b``) and ``a``, over the whole workload, timed for real. Compared with the
  factored Grassmann-only run.

Times are wall clock (``time.perf_counter``), CPU time of the process beside them; the factored
and QR-of-B figures are the median of ``--repeats`` runs (every run printed), after a small warm-up
call. The load average is printed at the start and end: on a shared machine, compare runs made at
a similar load. ``OMP_WAIT_POLICY`` is printed (the bench leaves it as found): when other jobs keep
the cores busy, spinning OpenMP threads waiting for a descheduled sibling can make a 2-thread run
several times slower; ``OMP_WAIT_POLICY=PASSIVE`` avoids that collapse but costs ~0.5 s when the
machine is quiet (measured on the 2-core development machines). The
last line is one JSON object with ``factored_s``, ``dense_s_extrapolated``, ``ratio`` (dense /
factored), ``qr_b_s``, ``ratio_vs_qr_b`` (QR-of-B / factored Grassmann), per-shape figures, and more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from geometry.analysis.distances import FACTORS, METRICS, all_distances, dense_distance
from geometry.linalg.factored import EPS64, grassmann_from_angles, principal_angles
from geometry.linalg.gram import single_thread
from geometry.testing import LLAMA3_8B_SHAPES, random_factors
from geometry.types import Adapter, AdapterConfig, LoraModule, ModuleKey, lora_scale

_PARENT = {"gate": "mlp", "up": "mlp", "down": "mlp"}


def make_adapters(n: int, layers: int, shapes: dict[str, tuple[int, int]], r: int, seed: int) -> list[Adapter]:
    """``n`` adapters of float32 factors from ``geometry.testing.random_factors``, alpha = 2r (deterministic)."""
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        modules = {}
        for layer in range(layers):
            for kind, (m, k) in shapes.items():
                key = ModuleKey("model", layer, kind)
                B, A = random_factors(m, k, r, seed=gen, dtype=torch.float32)
                name = f"model.layers.{layer}.{_PARENT.get(kind, 'self_attn')}.{kind}_proj"
                modules[key] = LoraModule(name, key, A, B, r, 2.0 * r, lora_scale(r, 2.0 * r))
        config = AdapterConfig(r=r, lora_alpha=2.0 * r, base_model_name_or_path="bench/llama-3-8b-shaped")
        out.append(Adapter(f"bench{i}", config, modules, content_hash=f"bench-{seed}-{i}"))
    return out


def sig(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits (tiny quick-run times stay non-zero)."""
    return float(f"{x:.{digits}g}")


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``), or ``n/a``."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c


class Repeated:
    """Median wall and CPU seconds over repeated runs, and every run's wall time."""

    def __init__(self, clocks: list[Clock]):
        walls = sorted(c.wall for c in clocks)
        self.runs = [c.wall for c in clocks]
        self.wall = walls[len(walls) // 2]
        self.cpu = sorted(c.cpu for c in clocks)[len(clocks) // 2]

    def describe(self) -> str:
        return f"{len(self.runs)} runs: " + ", ".join(f"{w:.2f}" for w in self.runs) + " s"


def timed(fn, repeats: int) -> Repeated:
    clocks = []
    for _ in range(max(1, repeats)):
        with Clock() as c:
            fn()
        clocks.append(c)
    return Repeated(clocks)


# ---------------------------------------------------------------------------------------------
# Dense baseline: one SVD per adapter and module, cached; pairs from the cached bases
def _basis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of ``Im(M)`` from one thin SVD (of ``M^T`` when ``M`` is wide: the faster way round)."""
    if M.shape[0] < M.shape[1]:
        _, S, Vh = torch.linalg.svd(M.mT, full_matrices=False)
        U = Vh.mT
    else:
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
    rank = int((S > max(M.shape) * EPS64 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    return U[:, :rank]


def dense_prepare(mod: LoraModule) -> dict[str, torch.Tensor]:
    """Per adapter and module: dense ``tau`` (float64) and the bases of ``tau``, ``B``, ``A^T`` (one SVD each)."""
    tau = mod.dense(torch.float64)
    B, At = mod.B.double(), mod.A.double().T
    return {"tau": tau, "B": B, "At": At, "U_tau": _basis(tau), "U_B": _basis(B), "U_A": _basis(At)}


def _grassmann(U1: torch.Tensor, U2: torch.Tensor) -> float:
    theta, _ = principal_angles(U1, U1.shape[1], U2, U2.shape[1])
    return float(grassmann_from_angles(theta, U1.shape[1], U2.shape[1]))


def dense_pair(p1: dict, p2: dict) -> dict[str, float]:
    """Per pair: every metric x factor from the cached dense matrices and bases."""
    out = {}
    for factor, x, u in (("ba", "tau", "U_tau"), ("b", "B", "U_B"), ("a", "At", "U_A")):
        out[f"l2/{factor}"] = dense_distance(p1[x], p2[x], "l2")
        out[f"cosine/{factor}"] = dense_distance(p1[x], p2[x], "cosine")
        out[f"grassmann/{factor}"] = _grassmann(p1[u], p2[u])
    return out


def dense_module(adapters: list[Adapter], key: ModuleKey, n_prep: int) -> dict[str, float]:
    """Time the dense per-adapter step on ``n_prep`` adapters and the per-pair step (all pairs among them, or (0, 1))."""
    preps, prep_times = [], []
    for ad in adapters[:n_prep]:
        with Clock() as c:
            preps.append(dense_prepare(ad.modules[key]))
        prep_times.append((c.wall, c.cpu))
    if n_prep == 1:  # partner's basis of Im(tau) from the QR of B (same subspace), not re-timed
        mod = adapters[1].modules[key]
        partner = {"tau": mod.dense(torch.float64), "B": mod.B.double(), "At": mod.A.double().T}
        partner["U_tau"] = partner["U_B"] = torch.linalg.qr(partner["B"])[0]
        partner["U_A"] = torch.linalg.qr(partner["At"])[0]
        pairs = [(preps[0], partner)]
    else:
        pairs = [(preps[i], preps[j]) for i in range(n_prep) for j in range(i + 1, n_prep)]
    pair_times = []
    for p1, p2 in pairs:
        with Clock() as c:
            dense_pair(p1, p2)
        pair_times.append((c.wall, c.cpu))
    mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
    return {
        "prep_s": mean(prep_times, 0), "prep_cpu_s": mean(prep_times, 1), "pair_s": mean(pair_times, 0),
        "pair_cpu_s": mean(pair_times, 1), "adapters_timed": n_prep, "pairs_timed": len(pairs),
    }


# ---------------------------------------------------------------------------------------------
# QR-of-B shortcut: Grassmann from QR(B) and QR(A^T) per adapter, batched over layers, cached
def qr_b_workload(adapters: list[Adapter], kinds: list[str], layers: int) -> dict[tuple[str, str], torch.Tensor]:
    """Grassmann on ``b`` (= ``ba`` via Im(BA) = Im(B)) and ``a`` for every pair and module: ``{(kind, factor): (pairs, layers)}``."""
    out = {}
    for kind in kinds:
        keys = [ModuleKey("model", layer, kind) for layer in range(layers)]
        with single_thread():  # Householder QR: 1 thread is 5-10x faster here than 2 (measured)
            Qb = [torch.linalg.qr(torch.stack([ad.modules[k].B.double() for k in keys]))[0] for ad in adapters]
            Qa = [torch.linalg.qr(torch.stack([ad.modules[k].A.double().T for k in keys]))[0] for ad in adapters]
        for factor, Q in (("b", Qb), ("a", Qa)):
            values = []
            for i in range(len(adapters)):
                for j in range(i + 1, len(adapters)):
                    r1, r2 = Q[i].shape[-1], Q[j].shape[-1]
                    theta, _ = principal_angles(Q[i], r1, Q[j], r2)
                    values.append(grassmann_from_angles(theta, r1, r2))
            out[kind, factor] = torch.stack(values) if values else torch.zeros(0, layers)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 adapters, 2 layers (no timing claims)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adapters", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    start_load = loadavg()
    p.add_argument("--repeats", type=int, default=3, help="runs of the factored and QR-of-B timings (median reported)")
    p.add_argument(
        "--dense-adapters", type=int, default=None,
        help="adapters whose dense SVD is timed per shape (default 1; all in --quick); 8 = the whole module for real",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        shapes = {k: (max(8, m // 128), max(8, n // 128)) for k, (m, n) in LLAMA3_8B_SHAPES.items()}
        n_ad, n_layers, r = args.adapters or 3, args.layers or 2, args.rank or 4
    else:
        shapes = dict(LLAMA3_8B_SHAPES)
        n_ad, n_layers, r = args.adapters or 8, args.layers or 32, args.rank or 16
    n_prep = max(1, min(n_ad, args.dense_adapters or (n_ad if args.quick else 1)))
    pairs = n_ad * (n_ad - 1) // 2
    device = torch.device("cpu")
    print(f"workload: {n_ad} adapters x {n_layers} layers x {len(shapes)} modules = {n_layers * len(shapes)} modules, "
          f"r = {r}, {pairs} pairs, metrics {', '.join(METRICS)}, factors {', '.join(FACTORS)}; "
          f"torch threads = {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"load average at start {start_load}")
    with Clock() as c:
        adapters = make_adapters(n_ad, n_layers, shapes, r, args.seed)
    print(f"generated factors in {c.wall:.1f} s (not timed below)")

    all_distances(adapters[:2], kind=[next(iter(shapes))], device=device)  # warm-up (imports, first calls)
    fac = timed(lambda: all_distances(adapters, metrics=METRICS, factors=FACTORS, device=device), args.repeats)
    print(f"factored, all metrics x factors: {fac.wall:.2f} s wall, {fac.cpu:.2f} s CPU, measured "
          f"(median of {fac.describe()})")
    fac_g = timed(lambda: all_distances(adapters, metrics=["grassmann"], factors=FACTORS, device=device), args.repeats)
    print(f"factored, Grassmann only (ba, a, b): {fac_g.wall:.2f} s wall, {fac_g.cpu:.2f} s CPU, measured "
          f"(median of {fac_g.describe()})")
    qr = timed(lambda: qr_b_workload(adapters, list(shapes), n_layers), args.repeats)
    print(f"QR-of-B shortcut, Grassmann on ba (= b) and a: {qr.wall:.2f} s wall, {qr.cpu:.2f} s CPU, measured "
          f"(median of {qr.describe()})")

    groups: dict[tuple[int, int], list[str]] = {}
    for kind, shape in shapes.items():
        groups.setdefault(shape, []).append(kind)
    per_shape = {}
    dense_total = dense_total_cpu = 0.0
    for shape, kinds in groups.items():
        label = "/".join(kinds)
        with Clock() as fs:
            all_distances(adapters, kind=kinds, metrics=METRICS, factors=FACTORS, device=device)
        d = dense_module(adapters, ModuleKey("model", 0, kinds[0]), n_prep)
        modules = len(kinds) * n_layers
        one = n_ad * d["prep_s"] + pairs * d["pair_s"]
        one_cpu = n_ad * d["prep_cpu_s"] + pairs * d["pair_cpu_s"]
        dense_total += one * modules
        dense_total_cpu += one_cpu * modules
        per_shape[label] = {
            "shape": f"{shape[0]}x{shape[1]}", "modules": modules, "factored_s": sig(fs.wall),
            "dense_adapter_s": sig(d["prep_s"]), "dense_pair_s": sig(d["pair_s"]), "dense_module_s": sig(one),
            "dense_s_extrapolated": sig(one * modules), "ratio": sig(one * modules / fs.wall),
        }
        print(f"  {label:8s} {shape[0]:5d}x{shape[1]:<5d} x {modules:3d} modules: factored {fs.wall:.2f} s measured; "
              f"dense per adapter (tau + SVDs) {d['prep_s']:.2f} s measured on {d['adapters_timed']} adapter(s), "
              f"per pair {d['pair_s'] * 1e3:.1f} ms measured on {d['pairs_timed']} pair(s) -> one module "
              f"{n_ad} x {d['prep_s']:.2f} + {pairs} x {d['pair_s']:.3f} = {one:.1f} s, x {modules} modules = "
              f"{one * modules:.0f} s; ratio {one * modules / fs.wall:.0f}x")
    ratio = dense_total / fac.wall
    ratio_qr = qr.wall / fac_g.wall
    print(f"dense (cached SVD), whole workload: {dense_total:.0f} s = sum over shapes of measured per-module "
          f"times x module counts ({dense_total_cpu:.0f} s CPU)")
    print(f"ratios: dense / factored = {ratio:.0f}x (all metrics x factors); QR-of-B / factored Grassmann = "
          f"{ratio_qr:.2f}x; load average at end {loadavg()}")
    print(json.dumps({
        "factored_s": sig(fac.wall),
        "dense_s_extrapolated": sig(dense_total),
        "ratio": sig(ratio),
        "qr_b_s": sig(qr.wall),
        "factored_grassmann_s": sig(fac_g.wall),
        "ratio_vs_qr_b": sig(ratio_qr),
        "factored_runs_s": [sig(w, 4) for w in fac.runs],
        "factored_cpu_s": sig(fac.cpu),
        "dense_cpu_s_extrapolated": sig(dense_total_cpu),
        "qr_b_cpu_s": sig(qr.cpu),
        "qr_b_runs_s": [sig(w, 4) for w in qr.runs],
        "factored_grassmann_cpu_s": sig(fac_g.cpu),
        "per_shape": per_shape,
        "dense_adapters_timed": n_prep,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": start_load,
        "load_average_end": loadavg(),
        "adapters": n_ad,
        "layers": n_layers,
        "rank": r,
        "quick": bool(args.quick),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
