"""Cross-check of the merge methods against FusionBench's implementations, on the sample adapters.

For each module (``query`` / ``value`` of all-MiniLM-L6-v2, ``384 x 384``) of the 8 sample task
adapters, the dense task vectors ``tau_t = s_t B_t A_t`` (float64) are built one module at a time and
handed to FusionBench's per-tensor functions; the result is compared with
``geometry.merging.merge(adapters, method, ...)`` (float64, CPU; ``keep_dense=True`` for the
element-wise methods, ``.dense()`` of the factored ones). Printed: the relative Frobenius error
``||ours - theirs||_F / ||theirs||_F`` per check (max over modules), twice per method where the
conventions differ: ``<method>`` with both sides at their defaults (``scaling_factor`` / weights 1),
``<method>:agree`` with the setting that removes the difference (listed in the output). Last line:
one JSON object ``{check: max relative error, or null where FusionBench has no such method}``.

    pip install --no-deps --target /tmp/fusionbench_pkg fusion-bench==0.2.33
    .venv/bin/python bench/crosscheck_fusionbench.py --fusionbench-path /tmp/fusionbench_pkg
    .venv/bin/python bench/crosscheck_fusionbench.py --layers 0 --kinds v    # one module

Without FusionBench (``--fusionbench-path``, default ``$FUSIONBENCH_PATH``, else ``sys.path``) it
prints one line saying the check is skipped and exits 0.

**How FusionBench is loaded.** ``import fusion_bench`` runs the package ``__init__``, which imports
omegaconf, hydra, lightning and transformers (FusionBench's dependencies, installed here with
``--no-deps``, so absent). The package ``__init__`` is therefore never run: only these five module
files are executed, each with :func:`importlib.util.spec_from_file_location` under a private name,
bypassing the ``__init__`` of ``fusion_bench`` and of ``fusion_bench.method`` and its subpackages:

- ``fusion_bench/method/task_singular_vector/utils/TSVM_utils.py`` (``compute_and_sum_svd_mem_reduction``, TSV-M)
- ``fusion_bench/method/task_singular_vector/utils/task_singular_interference.py``
- ``fusion_bench/method/isotropic_merging/iso_utils.py`` (``iso_c``, ``iso_cts``)
- ``fusion_bench/method/knots/knots_utils.py`` (``subspace_alignment``)
- ``fusion_bench/method/ties_merging/ties_merging_utils.py`` (``ties_merging``)
- ``fusion_bench/method/dare/utils.py`` (``param_random_drop_``)

The one stub: while they load, ``sys.modules["fusion_bench"]`` is an empty module object whose
``__path__`` is the installed package folder, so that their ``from fusion_bench.utils import
timeit_context`` / ``from fusion_bench.utils.type import StateDictType`` resolve to the installed
files (``fusion_bench/utils/__init__.py`` is lazy and needs only torch and typing_extensions). The
previous ``sys.modules`` entries are restored afterwards. A ``fusion_bench`` already imported in
full is used as it is. Their progress prints are swallowed. Nothing of FusionBench is copied here.

**What is called.** FusionBench's algorithm classes (``TaskSingularVectorMerging.run`` ...) need a
model pool; their bodies are, per 2-D weight, the functions above, called here on one-key state
dicts ``{"w": tau_t}`` (``accelerator="cpu"``), with ``scaling_factor`` / ``alpha`` 1 (our weights 1):

- ``tsv_m``: ``compute_and_sum_svd_mem_reduction``; ``:agree``: the same function on the ``K x K``
  cores ``C_t = Q_b^T tau_t Q_a`` (``Q_b``, ``Q_a`` orthonormal bases of the joint column / row
  spaces, ``K = sum r_t = 64``), lifted back as ``Q_b M Q_a^T``.
- ``iso_c`` / ``iso_cts``: ``iso_c`` / ``iso_cts(common_space_fraction=0.8)`` (their config default)
  against ours with ``spectrum="full"`` (``iso_cts:vs_rank``: against ``spectrum="rank"``);
  ``:agree``: on the cores as above, against ``spectrum="rank"``; ``iso_c:project``: their dense
  output compressed to ``Im(Delta_TA) x Im(Delta_TA^T)``, against ``spectrum="full"``.
- ``knots``: FusionBench has no KnOTS merge, only KnOTS's basis (``subspace_alignment``); KnOTS-TIES
  is composed from it and their ``ties_merging``: ``U ties_merging([S Vh_t])`` (density 0.2,
  ``merge_func="mean"``), against ``merge(..., "knots")`` (TIES, density 0.2).
- ``ties``: ``ties_merging`` on the ``(T, m n)`` flattened task vectors (their config: ``threshold
  20``, ``merge_func="sum"``) against ``ties`` (density 0.2).
- ``dare_linear`` / ``dare_ties``: FusionBench draws its masks with ``torch.rand_like(param) >
  sparsity``; for an entry-wise comparison our own masks (``geometry.merging.dare.drop_and_rescale``
  with the module's seeded generator) are injected by replacing ``torch.rand_like`` during their
  ``param_random_drop_`` calls, so their drop and rescale rules run on the same draws. Then the sum
  (``DareTaskArithmetic``) or ``ties_merging`` (``DareTiesMerging``, config: ``threshold 20``,
  ``merge_func="sum"``).
- ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, ``core_space``: not in
  FusionBench 0.2.33 (null).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from geometry.io.loader import load_adapter
from geometry.merging import merge
from geometry.merging.dare import drop_and_rescale, mask_generator

REPO = Path(__file__).resolve().parents[1]

TASKS = ("acceptability", "negation", "news_topic", "nli", "paraphrase", "question", "sentiment_movies",
         "sentiment_products")

FB_FILES = {
    "tsvm": "method/task_singular_vector/utils/TSVM_utils.py",
    "sti": "method/task_singular_vector/utils/task_singular_interference.py",
    "iso": "method/isotropic_merging/iso_utils.py",
    "knots": "method/knots/knots_utils.py",
    "ties": "method/ties_merging/ties_merging_utils.py",
    "dare": "method/dare/utils.py",
}

ABSENT = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "core_space")

#: the conventions that differ, per method, and the setting that makes the two agree
CONVENTIONS: dict[str, list[str]] = {
    "tsv_m": [
        "FusionBench keeps int(min(m, n) / T) = 48 components of each dense SVD, whatever the task's rank (8): "
        "40 singular vectors of singular value 0 per task (an arbitrary LAPACK basis of the null space) enter "
        "the polar factors; ours keeps min(rank, int(min(m, n) / T)) = 8. Agree: run theirs on the K x K cores "
        "(K = sum r_t = 64, int(64 / 8) = 8 = r_t, nothing padded).",
        "Task weights: FusionBench's list alpha scales tau_t before the SVD (= our weights); a float alpha "
        "scales the result (= our alpha). Both 1 here.",
    ],
    "iso_c": [
        "FusionBench (authors) averages all min(m, n) = 384 singular values of Delta_TA, zeros included, and "
        "returns mean * U V^T over all 384 directions, 320 of them null directions of Delta_TA chosen by LAPACK "
        "(its output has rank 384). Ours spectrum='full' divides by min(m, n) too but keeps only the R = 64 "
        "determined directions: agree with their output projected on Im(Delta) x Im(Delta^T) (iso_c:project). "
        "Ours spectrum='rank' (default) averages over R: agrees with theirs on the cores (iso_c:agree).",
        "scaling_factor: FusionBench requires one (config 1.0); ours alpha, default 1.0.",
    ],
    "iso_cts": [
        "FusionBench splits D = min(m, n) = 384: k_c = 304 common directions of Delta_TA (rank 64: 240 of them "
        "arbitrary null directions), 10 per task from the residuals tau_t - U_c U_c^T tau_t, which are rounding "
        "noise (Im tau_t lies in Im Delta_TA); their output is not a function of the task vectors. Ours "
        "spectrum='full' reduces to Iso-C 'full' here; spectrum='rank' (default) splits D = R = 64 (48 common, "
        "2 per task). Agree: theirs on the 64 x 64 cores vs ours spectrum='rank' (iso_cts:agree).",
        "common_space_fraction 0.8 on both sides (their config, our default).",
    ],
    "knots": [
        "FusionBench 0.2.33 has no KnOTS merge, only subspace_alignment (the SVD of [tau_1..tau_T], m x Tn, as "
        "ours); checked as KnOTS-TIES composed of subspace_alignment + their ties_merging (merge_func 'mean').",
        "Kept components: theirs S > 1e-4 (absolute), ours the numerical rank (S > max(m, Tn) eps S_1).",
        "TIES trim: see ties (one extra entry per task). Agree: their K lowered by one entry.",
        "Signs of singular vectors: theirs LAPACK's, ours canonical; TIES is odd, no effect unless an elected "
        "mass is exactly 0.",
    ],
    "ties": [
        "Trim: FusionBench's topk_values_mask keeps |x| >= the (d - int(d K))-th smallest, i.e. int(d K) + 1 "
        "entries (and every tie at the threshold); ours floor(density d). Agree: K = (int(0.2 d) - 0.5) / d.",
        "Disjoint merge: FusionBench's config merge_func='sum' (no division); ours the mean over agreeing tasks "
        "(the paper's dis-mean). Agree: merge_func='mean'.",
        "Zero elected sign: FusionBench replaces sign 0 by the sign of the sum of all elected signs; ours +1.",
        "Scope: FusionBench's TiesMergingAlgorithm flattens the whole model (one trim over all parameters, "
        "scaling_factor 0.3 in its config); ours trims per module (compared here per module, scaling 1).",
    ],
    "dare_linear": [
        "Masks: FusionBench torch.rand_like(param) > p from the global generator over the whole model; ours "
        "torch.bernoulli(density) from a per-module seeded generator. Same draws injected here; rescale 1/(1-p) "
        "and the sum agree (scaling_factor 1).",
    ],
    "dare_ties": [
        "FusionBench's DareTiesMerging runs the whole ties_merging after the drop: a second magnitude trim "
        "(config threshold 20) and merge_func 'sum'; ours (peft's) elects signs on the dropped vectors and "
        "takes the disjoint mean, no second trim. Agree: threshold that keeps every entry, merge_func 'mean'.",
        "Masks: as dare_linear (injected).",
    ],
    "task_interference": [
        "FusionBench's compute_task_singular_interference concatenates U_t along rows (torch.cat(dim=0)), "
        "S_t of all tasks into one diag (T min(m, n) wide) and asks torch.linalg.norm for ord='1' (a string); "
        "ours concatenates columns (the paper) and uses the entry-wise 1-norm. Not compared numerically; "
        "the outcome of calling theirs is shown above.",
    ],
}


# ----------------------------------------------------------------------------- loading FusionBench
def _package_dir(fusionbench_path: str | None) -> Path | None:
    if fusionbench_path:
        root = Path(fusionbench_path)
        return root / "fusion_bench" if (root / "fusion_bench" / "__init__.py").is_file() else None
    for entry in sys.path:
        cand = Path(entry or ".") / "fusion_bench"
        if (cand / "__init__.py").is_file():
            return cand
    return None


def load_fusionbench(fusionbench_path: str | None = None) -> types.SimpleNamespace | None:
    """FusionBench's per-tensor modules (see the module docstring), or ``None`` when it is absent."""
    pkg = _package_dir(fusionbench_path)
    if pkg is None:
        return None
    if fusionbench_path and str(Path(fusionbench_path)) not in sys.path:
        sys.path.insert(0, str(Path(fusionbench_path)))
    saved = {k: v for k, v in sys.modules.items() if k == "fusion_bench" or k.startswith("fusion_bench.")}
    shell = "fusion_bench" not in sys.modules
    out = {}
    try:
        if shell:
            stub = types.ModuleType("fusion_bench")
            stub.__path__ = [str(pkg)]
            sys.modules["fusion_bench"] = stub
        for name, rel in FB_FILES.items():
            spec = importlib.util.spec_from_file_location(f"_fusionbench_{name}", pkg / rel)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            out[name] = mod
    except (ImportError, OSError) as exc:
        print(f"FusionBench at {pkg} could not be loaded ({type(exc).__name__}: {exc})")
        return None
    finally:
        if shell:
            for k in [k for k in sys.modules if k == "fusion_bench" or k.startswith("fusion_bench.")]:
                if k not in saved:
                    del sys.modules[k]
    version = "?"
    for dist in pkg.parent.glob("fusion_bench-*.dist-info"):
        version = dist.name[len("fusion_bench-"):-len(".dist-info")]
    return types.SimpleNamespace(path=pkg, version=version, **out)


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _injected_rand_like(values: Sequence[torch.Tensor]):
    """``torch.rand_like`` returns ``values`` in turn (FusionBench's DARE keeps ``rand > p``)."""
    it = iter(values)
    original = torch.rand_like
    torch.rand_like = lambda t, *a, **k: next(it).to(dtype=t.dtype, device=t.device)
    try:
        yield
    finally:
        torch.rand_like = original


# ------------------------------------------------------------------------------------ helpers
def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / max(float(theirs.norm()), 1e-300))


def _basis(M: torch.Tensor, both: bool = False):
    """Orthonormal basis of the column space of ``M`` (numerical rank); with ``both``, of its row space too."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = S > max(M.shape) * torch.finfo(M.dtype).eps * S[0]
    return (U[:, keep], Vh[keep].T) if both else U[:, keep]


def load_task_adapters(root: Path, layers: Sequence[int] | None, kinds: Sequence[str] | None):
    ads = []
    for name in TASKS:
        ad = load_adapter(root / name, name=name)
        keep = {k: v for k, v in ad.modules.items()
                if (layers is None or k.layer in layers) and (kinds is None or k.kind in kinds)}
        ads.append(replace(ad, modules=keep))
    if not ads[0].modules:
        raise SystemExit(f"no module left with layers={layers} kinds={kinds}")
    return ads


def ties_keep_all(d: int) -> float:
    """FusionBench ``topk_values_mask`` fraction ``K`` that keeps every entry (``K = 1`` would ask ``kthvalue(0)``)."""
    return (d - 0.5) / d


def ties_keep_exact(d: int, density: float) -> float:
    """FusionBench ``K`` that keeps exactly ``floor(density d)`` entries (it keeps ``int(d K) + 1``)."""
    return (int(density * d) - 0.5) / d


# --------------------------------------------------------------------------------------- checks
#: method families checked, in order (``--methods``)
METHODS = ("tsv_m", "iso_c", "iso_cts", "knots", "ties", "dare")


def crosscheck(fb, ads, methods: Sequence[str] = METHODS, *, density_ties: float = 0.2, density_dare: float = 0.5,
               seed: int = 0, common_space_fraction: float = 0.8) -> tuple[dict[str, list[float]], dict[str, object]]:
    """``({check: [relative error per module]}, extra info)`` for the method families ``methods``."""
    kw = {"dtype": torch.float64, "device": "cpu"}
    cts = {"common_space_fraction": common_space_fraction}
    runs = {
        "tsv_m": {"tsv_m": ("tsv_m", {})},
        "iso_c": {"iso_c_full": ("iso_c", {"spectrum": "full"}), "iso_c_rank": ("iso_c", {"spectrum": "rank"})},
        "iso_cts": {"iso_cts_full": ("iso_cts", {"spectrum": "full", **cts}),
                    "iso_cts_rank": ("iso_cts", {"spectrum": "rank", **cts})},
        "knots": {"knots": ("knots", {"merge_method": "ties", "density": density_ties})},
        "ties": {"ties": ("ties", {"density": density_ties, "keep_dense": True})},
        "dare": {"dare_linear": ("dare_linear", {"density": density_dare, "seed": seed, "keep_dense": True}),
                 "dare_ties": ("dare_ties", {"density": density_dare, "seed": seed, "keep_dense": True})},
    }
    ours = {name: merge(ads, method, **params, **kw)
            for family in methods for name, (method, params) in runs[family].items()}
    errs: dict[str, list[float]] = {}
    info: dict[str, object] = {"knots_kept": [], "sti": None}

    def add(name, value):
        errs.setdefault(name, []).append(value)

    for key in ads[0].modules:
        mods = [ad.modules[key] for ad in ads]
        taus = [mod.dense(torch.float64) for mod in mods]
        T, (m, n) = len(taus), taus[0].shape
        sds = [{"w": tau} for tau in taus]
        dense = {name: res.modules[key].dense(torch.float64) for name, res in ours.items()}
        Qb = _basis(torch.cat([mod.scale * mod.B.double() for mod in mods], dim=1))
        Qa = _basis(torch.cat([mod.A.double() for mod in mods], dim=0).T)
        cores = [{"w": Qb.T @ tau @ Qa} for tau in taus]

        def lift(core_sd, Qb=Qb, Qa=Qa):
            return Qb @ core_sd["w"] @ Qa.T

        with _quiet():
            if "tsv_m" in methods:
                theirs = fb.tsvm.compute_and_sum_svd_mem_reduction(sds, accelerator="cpu")["w"]
                add("tsv_m", rel(dense["tsv_m"], theirs))
                theirs = lift(fb.tsvm.compute_and_sum_svd_mem_reduction(cores, accelerator="cpu"))
                add("tsv_m:agree", rel(dense["tsv_m"], theirs))
            if "iso_c" in methods:
                theirs = fb.iso.iso_c(sds, accelerator="cpu")["w"]
                add("iso_c", rel(dense["iso_c_full"], theirs))
                U, V = _basis(sum(taus), both=True)  # Im(Delta_TA), Im(Delta_TA^T)
                add("iso_c:project", rel(dense["iso_c_full"], U @ (U.T @ theirs @ V) @ V.T))
                add("iso_c:agree", rel(dense["iso_c_rank"], lift(fb.iso.iso_c(cores, accelerator="cpu"))))
            if "iso_cts" in methods:
                theirs = fb.iso.iso_cts(sds, common_space_fraction, accelerator="cpu")["w"]
                add("iso_cts", rel(dense["iso_cts_full"], theirs))
                add("iso_cts:vs_rank", rel(dense["iso_cts_rank"], theirs))
                theirs = lift(fb.iso.iso_cts(cores, common_space_fraction, accelerator="cpu"))
                add("iso_cts:agree", rel(dense["iso_cts_rank"], theirs))
            if "knots" in methods:  # KnOTS-TIES from their basis and their TIES
                U_k, S_k, Vhs = fb.knots.subspace_alignment(taus)
                X = torch.stack([S_k[:, None] * Vh for Vh in Vhs]).reshape(T, -1)
                info["knots_kept"].append((int(S_k.shape[0]), int(ours["knots"].modules[key].rank)))
                for name, K in (("knots", density_ties), ("knots:agree", ties_keep_exact(X.shape[1], density_ties))):
                    merged = fb.ties.ties_merging(X.clone(), reset_thresh=K, merge_func="mean")
                    add(name, rel(dense["knots"], U_k @ merged.reshape(-1, n)))
            if "ties" in methods:  # their config: threshold 20 (percent kept), merge_func "sum"
                flat = torch.stack(taus).reshape(T, -1)
                theirs = fb.ties.ties_merging(flat.clone(), reset_thresh=20, merge_func="sum").reshape(m, n)
                add("ties", rel(dense["ties"], theirs))
                K = ties_keep_exact(m * n, density_ties)
                theirs = fb.ties.ties_merging(flat.clone(), reset_thresh=K, merge_func="mean").reshape(m, n)
                add("ties:agree", rel(dense["ties"], theirs))
            if "dare" in methods:  # our masks injected into their drop
                masks = drop_and_rescale(torch.ones(T, m, n, dtype=torch.float64), density_dare,
                                         mask_generator(seed, key, torch.device("cpu"))) * density_dare
                dropped = [tau.clone() for tau in taus]
                with _injected_rand_like(list(masks)):
                    for p in dropped:
                        fb.dare.param_random_drop_(p, 1.0 - density_dare, rescale=True)
                add("dare_linear", rel(dense["dare_linear"], sum(dropped)))
                flat = torch.stack(dropped).reshape(T, -1)
                theirs = fb.ties.ties_merging(flat.clone(), reset_thresh=20, merge_func="sum").reshape(m, n)
                add("dare_ties", rel(dense["dare_ties"], theirs))
                theirs = fb.ties.ties_merging(flat.clone(), reset_thresh=ties_keep_all(m * n), merge_func="mean")
                add("dare_ties:agree", rel(dense["dare_ties"], theirs.reshape(m, n)))
            if "tsv_m" in methods and info["sti"] is None:
                try:
                    info["sti"] = f"returned {float(fb.sti.compute_task_singular_interference(taus)):.6g}"
                except Exception as exc:  # noqa: BLE001 - reported, not hidden
                    info["sti"] = f"raises {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return errs, info


def _parse_ints(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",")]


def main(argv: Sequence[str] | None = None) -> dict[str, float | None] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fusionbench-path", default=os.environ.get("FUSIONBENCH_PATH"),
                    help="folder holding the fusion_bench package (default $FUSIONBENCH_PATH, else sys.path)")
    ap.add_argument("--adapters", default=str(REPO / "sample_adapters" / "synthetic"), help="folder of the 8 task adapters")
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default all)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--kinds", default=None, help="comma-separated module kinds, e.g. q,v (default all)")
    args = ap.parse_args(argv)

    fb = load_fusionbench(args.fusionbench_path)
    if fb is None:
        print("crosscheck_fusionbench: skipped, FusionBench (fusion_bench) is not importable "
              "(pip install --no-deps --target DIR fusion-bench; --fusionbench-path DIR)")
        return None
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    ads = load_task_adapters(Path(args.adapters), _parse_ints(args.layers),
                             None if not args.kinds else args.kinds.split(","))
    keys = list(ads[0].modules)
    print(f"FusionBench {fb.version} from {fb.path}; {len(ads)} adapters, {len(keys)} modules "
          f"({', '.join(k.label for k in keys)})")
    methods = [x for x in args.methods.split(",") if x]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    errs, info = crosscheck(fb, ads, methods)
    print(f"{'check':<18} {'max rel err':>12} {'min':>10}  (||ours - theirs||_F / ||theirs||_F over modules)")
    for name, vals in errs.items():
        print(f"{name:<18} {max(vals):>12.3e} {min(vals):>10.3e}")
    if info["knots_kept"]:
        print(f"KnOTS components kept (theirs S > 1e-4, ours numerical rank): {sorted(set(info['knots_kept']))}")
    if info["sti"]:
        print(f"FusionBench compute_task_singular_interference: {info['sti']}")
    print("Conventions that differ (and the setting that makes them agree):")
    shown = set(methods) | ({"dare_linear", "dare_ties"} if "dare" in methods else set())
    shown |= {"task_interference"} if "tsv_m" in methods else set()
    for method, notes in CONVENTIONS.items():
        if method not in shown:
            continue
        for note in notes:
            print(f"- {method}: {note}")
    for method in ABSENT:
        print(f"- {method}: not in FusionBench {fb.version} (null)")
    result: dict[str, float | None] = {name: max(vals) for name, vals in errs.items()}
    result.update({method: None for method in ABSENT})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
