"""Fixed costs of the library: ``import geometry``, a first call against the second, the CLI's start.

    .venv/bin/python bench/fixed_costs.py                 # 5 fresh processes per figure (median)
    .venv/bin/python bench/fixed_costs.py --quick         # smoke run (2 processes, smaller adapters)

Every figure is measured in fresh Python processes (``--repeats`` of them, the median printed with
every run), each against a baseline measured the same way in the same run:

* ``import geometry`` (``time.perf_counter`` around the import, in ``python -c``) against
  ``import numpy``; the heavy modules (torch, scipy, pandas, transformers, sympy) the import left
  loaded are listed (none expected);
* ``python -m geometry --version``, the wall time of the whole process, against
  ``python -c "import numpy"``;
* a first ``geometry.anatomy`` of one adapter against the second call in the same process (the
  adapter loaded by ``geometry.load`` before either), and the first against numpy's SVD of every
  dense update ``s B A`` of that adapter (first call too);
* a first ``geometry.distances`` of a small pair (Grassmann, on ``v``) against the second, and
  against the same distance from numpy's SVDs of the dense updates (whose value must agree: the
  largest difference is printed and in the JSON).

The adapters are two random ones from :mod:`geometry.testing` with the sample adapters' shapes
(all-MiniLM-L6-v2: 6 layers, q and v of 384 x 384, r = 8), saved as peft folders in a temporary
directory. Thread counts are pinned to ``--threads`` (default 1) in every child, baselines included.

Beside the measured figures, the review's figures for the peers (not installed here, so not measured
in this run) and for this library before the fix are printed, labelled as such. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "scipy", "pandas", "transformers", "sympy", "sklearn", "peft")

#: The review's figures (Library 2.0 issue): peers measured there, not here (not installed).
REVIEW_PEERS = {
    "gradience_principal_angles_slower": {"ratio": 6.6, "workload": "8 Llama-shaped adapters"},
    "weightwatcher_spectra_slower": {"ratio": 22.0, "workload": "a large adapter"},
}
#: The review's figures for this library before the fix (the first call paid sympy's import).
REVIEW_BEFORE = {"import_geometry_s": "3.3 to 6", "first_torch_broadcast_shapes_s": "0.7 to 0.8",
                 "first_anatomy_s": "about 1", "second_anatomy_s": 0.008}

_IMPORT = ("import sys, time, json; t = time.perf_counter(); import {module}; dt = time.perf_counter() - t; "
           "print(json.dumps({{'seconds': dt, 'heavy': [m for m in {heavy!r} if m in sys.modules]}}))")


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                           "ADAPTER_ATLAS_THREADS"), str(threads))}


def _json_child(cmd: list[str], threads: int) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads))
    if proc.returncode:
        raise SystemExit(f"child {cmd[1:]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wall(cmd: list[str], threads: int) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, env=_env(threads))
    return time.perf_counter() - t


def _median(runs: list[float]) -> float:
    return statistics.median(runs)


def _runs(label: str, runs: list[float]) -> str:
    return f"{label} {_median(runs) * 1e3:.1f} ms (median of {len(runs)}: " + ", ".join(f"{r * 1e3:.1f}" for r in runs) + ")"


# ------------------------------------------------------------------------------------------- children
def _numpy_bases(adapter, kind: str | None = None) -> dict:
    """Dense updates ``s B A`` of ``adapter`` (numpy float64) and their column-space bases from one SVD each."""
    import numpy as np

    out = {}
    for key, mod in sorted(adapter.modules.items()):
        if kind is not None and key.kind != kind:
            continue
        tau = mod.scale * (mod.B.double().numpy() @ mod.A.double().numpy())
        U, S, _ = np.linalg.svd(tau, full_matrices=False)
        rank = int((S > max(tau.shape) * np.finfo(np.float64).eps * S[0]).sum()) if S.size and S[0] > 0 else 0
        out[key] = U[:, :rank]
    return out


def _numpy_grassmann(bases1: dict, bases2: dict) -> float:
    """Mean over the common modules of ``sqrt(sum theta_i^2)`` (principal angles from the SVD of ``U1^T U2``)."""
    import numpy as np

    values = []
    for key in sorted(set(bases1) & set(bases2)):
        cos = np.clip(np.linalg.svd(bases1[key].T @ bases2[key], compute_uv=False), 0.0, 1.0)
        values.append(float(np.sqrt((np.arccos(cos) ** 2).sum())))
    return float(np.mean(values))


def child(what: str, folder: str) -> dict:
    """One measurement in this (fresh) process; prints nothing itself."""
    import geometry

    ads = geometry.load([str(Path(folder) / "a0"), str(Path(folder) / "a1")])
    times = []
    if what == "anatomy":
        results = []
        for _ in range(2):
            t = time.perf_counter()
            results.append(geometry.anatomy(ads["a0"]))
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        _numpy_bases(ads["a0"])
        numpy_first = time.perf_counter() - t
        equal = results[0].equals(results[1])
        return {"first_s": times[0], "second_s": times[1], "numpy_first_s": numpy_first, "first_equals_second": equal}
    results = []
    for _ in range(2):
        t = time.perf_counter()
        results.append(geometry.distances(ads, metric="grassmann", kind="v"))
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    reference = _numpy_grassmann(_numpy_bases(ads["a0"], "v"), _numpy_bases(ads["a1"], "v"))
    numpy_first = time.perf_counter() - t
    ours = float(results[0].loc["a0", "a1"])
    return {"first_s": times[0], "second_s": times[1], "numpy_first_s": numpy_first,
            "first_equals_second": results[0].equals(results[1]), "max_abs_diff_vs_numpy": abs(ours - reference)}


# ------------------------------------------------------------------------------------------- parent
def _write_pair(root: Path, quick: bool) -> None:
    from geometry.testing import random_adapter, save_peft_folder

    size, layers = (96, 2) if quick else (384, 6)
    for i in range(2):
        ad = random_adapter(f"a{i}", layers=layers, kinds={"q": (size, size), "v": (size, size)}, r=8, seed=i,
                            base="sentence-transformers/all-MiniLM-L6-v2")
        save_peft_folder(ad, root / f"a{i}")


def measure(repeats: int, threads: int, quick: bool) -> dict:
    py = sys.executable
    out: dict = {"repeats": repeats, "threads": threads, "quick": quick}
    for module in ("geometry", "numpy"):
        rows = [_json_child([py, "-c", _IMPORT.format(module=module, heavy=HEAVY)], threads) for _ in range(repeats)]
        out[f"import_{module}_runs_s"] = [r["seconds"] for r in rows]
        out[f"import_{module}_heavy_modules"] = sorted({m for r in rows for m in r["heavy"]})
    out["cli_version_runs_s"] = [_wall([py, "-m", "geometry", "--version"], threads) for _ in range(repeats)]
    out["python_import_numpy_runs_s"] = [_wall([py, "-c", "import numpy"], threads) for _ in range(repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        _write_pair(Path(tmp), quick)
        for what in ("anatomy", "distances"):
            rows = [_json_child([py, __file__, "--child", what, tmp], threads) for _ in range(repeats)]
            for name in ("first", "second", "numpy_first"):
                out[f"{what}_{name}_runs_s"] = [r[f"{name}_s"] for r in rows]
            out[f"{what}_first_equals_second"] = all(r["first_equals_second"] for r in rows)
            if what == "distances":
                out["distances_max_abs_diff_vs_numpy"] = max(r["max_abs_diff_vs_numpy"] for r in rows)
    for key in [k for k in out if k.endswith("_runs_s")]:
        out[key.removesuffix("_runs_s") + "_s"] = _median(out[key])
    out["import_ratio_vs_numpy"] = out["import_geometry_s"] / out["import_numpy_s"]
    out["cli_version_ratio_vs_python_numpy"] = out["cli_version_s"] / out["python_import_numpy_s"]
    for what in ("anatomy", "distances"):
        out[f"{what}_first_vs_second"] = out[f"{what}_first_s"] / out[f"{what}_second_s"]
        out[f"{what}_first_vs_numpy"] = out[f"{what}_first_s"] / out[f"{what}_numpy_first_s"]
    out["review_peers"] = REVIEW_PEERS
    out["review_before"] = REVIEW_BEFORE
    return out


def report(r: dict) -> None:
    print(f"fixed costs, {r['repeats']} fresh processes per figure, {r['threads']} thread(s), load average "
          f"{os.getloadavg()[0]:.2f}")
    print(_runs("  import geometry:", r["import_geometry_runs_s"]) + f"; loads {r['import_geometry_heavy_modules'] or 'no heavy module'}")
    print(_runs("  import numpy (baseline):", r["import_numpy_runs_s"]) + f"  -> ratio {r['import_ratio_vs_numpy']:.2f}")
    print(_runs("  python -m geometry --version, whole process:", r["cli_version_runs_s"]))
    print(_runs("  python -c 'import numpy', whole process (baseline):", r["python_import_numpy_runs_s"])
          + f"  -> ratio {r['cli_version_ratio_vs_python_numpy']:.2f}")
    for what, label in (("anatomy", "geometry.anatomy of one adapter"), ("distances", "geometry.distances of a small pair")):
        print(f"  {label}: first {r[f'{what}_first_s'] * 1e3:.1f} ms, second {r[f'{what}_second_s'] * 1e3:.1f} ms "
              f"-> first / second {r[f'{what}_first_vs_second']:.2f}; numpy SVDs of the dense updates (first call) "
              f"{r[f'{what}_numpy_first_s'] * 1e3:.1f} ms -> first / numpy {r[f'{what}_first_vs_numpy']:.2f}")
    print(f"  distances vs numpy's dense Grassmann: largest difference {r['distances_max_abs_diff_vs_numpy']:.2e}")
    print("review's figures (Library 2.0 issue), NOT measured in this run:")
    print(f"  gradience's principal angles: {REVIEW_PEERS['gradience_principal_angles_slower']['ratio']}x slower than "
          f"this library on {REVIEW_PEERS['gradience_principal_angles_slower']['workload']} (gradience not installed here)")
    print(f"  WeightWatcher's spectra: {REVIEW_PEERS['weightwatcher_spectra_slower']['ratio']}x slower than this library "
          f"on {REVIEW_PEERS['weightwatcher_spectra_slower']['workload']} (WeightWatcher not installed here)")
    print(f"  this library before the fix: import geometry {REVIEW_BEFORE['import_geometry_s']} s, first "
          f"torch.broadcast_shapes {REVIEW_BEFORE['first_torch_broadcast_shapes_s']} s (sympy), first anatomy "
          f"{REVIEW_BEFORE['first_anatomy_s']} s against {REVIEW_BEFORE['second_anatomy_s'] * 1e3:.0f} ms for the second")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per figure (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS / torch threads in every child")
    ap.add_argument("--quick", action="store_true", help="smaller adapters and 2 repeats unless --repeats")
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    repeats = args.repeats if args.repeats != 5 or not args.quick else 2
    result = measure(max(1, repeats), args.threads, args.quick)
    report(result)
    print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
