"""Memory under pressure: many visitors upload as much as a demo server lets each, against its memory budget.

``python -m bench.memory_pressure [--sessions 8] [--uploads 6] [--mb 16] [--budget 200M] [--idle 15]``

A demo server (``ADAPTER_ATLAS_DEMO=1``) is started with ``ADAPTER_ATLAS_MEMORY_BUDGET`` and a short
``ADAPTER_ATLAS_IDLE_RELEASE_S`` on a tiny sample set; ``--sessions`` visitors (the websocket protocol client of
``bench/st_protocol.py``: what a browser sends, nothing rendered) open the Overview and each upload ``--uploads``
adapters of about ``--mb`` MB (all-MiniLM-L6-v2-shaped LoRA factors, float32, zipped) one after the other, all at
once. The server's RSS is sampled every 0.1 s. Then:

1. **held**: every visitor reruns its page; its sidebar must list exactly the uploads it was told were loaded
   (none vanished, none of another visitor's), and every refused upload must have said why;
2. **expiry**: the visitors go quiet for longer than the idle time; one new visitor uploads, which releases the
   idle visitors' uploads; each returning visitor must be told, and only then are its uploads gone.

Printed (and returned as a dict): sessions, bytes offered, bytes loaded, refusals, errors, the server's RSS before
the uploads and its peak, and whether the peak stayed under RSS-before + budget + margin. ``--json FILE`` writes it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

HIDDEN, LAYERS, KINDS = 384, 6, ("query", "key", "value", "dense")
REFUSED = "memory budget"
#: glibc's allocator, told to give freed memory back (as the Dockerfile sets it): without these, 16 MB buffers freed
#: by many threads stay in per-thread arenas and the RSS keeps ~40 % more than is held (measured: 454 vs 319 MiB)
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def adapter_zip(seed: int, mb: float, base: str = "sentence-transformers/all-MiniLM-L6-v2") -> bytes:
    """A peft LoRA adapter of about ``mb`` MB of float32 factors (all-MiniLM-L6-v2's shapes), zipped."""
    import torch
    from safetensors.torch import save

    r = max(1, round(mb * 2**20 / (LAYERS * len(KINDS) * 2 * HIDDEN * 4)))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for kind in KINDS:
            where = "attention.output" if kind == "dense" else "attention.self"
            prefix = f"base_model.model.encoder.layer.{layer}.{where}.{kind}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, HIDDEN, generator=gen) / HIDDEN**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, r, generator=gen) / HIDDEN**0.5
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(KINDS),
              "base_model_name_or_path": base, "task_type": "FEATURE_EXTRACTION"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # random floats do not compress
        zf.writestr("adapter_config.json", json.dumps(config))
        zf.writestr("adapter_model.safetensors", save(tensors))
    return buf.getvalue()


def write_samples(root: Path) -> Path:
    """Two tiny sample adapters (the server's bundled set; they are not what is measured)."""
    for k in range(2):
        folder = root / f"sample{k}"
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(adapter_zip(1000 + k, 0.05))) as zf:
            zf.extractall(folder)
    return root


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class RssWatch:
    """Sample a process's RSS every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.peak, self._stop = pid, interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return
            time.sleep(self.interval)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def sidebar_names(texts: list[str]) -> set[str]:
    """The adapter names the sidebar lists (``**name** <small>r ...``)."""
    names = set()
    for text in texts:
        names.update(m.replace("\\", "") for m in re.findall(r"\*\*([^*]+)\*\*(?: :material/fiber_new:)? <small>", text))
    return names


async def _visitor(url: str, k: int, zips: list[bytes], out: dict) -> None:
    from bench.st_protocol import Session

    s = await Session.open(url)
    record = {"loaded": [], "refused": [], "errors": [], "messages": [], "session": s}
    out[k] = record
    run = await s.visit("", timeout=120)
    record["errors"] += run.exceptions
    for j, data in enumerate(zips):
        name = f"visitor{k}x{j}"
        run = await s.upload([(f"{name}.zip", data)], timeout=300)
        record["errors"] += run.exceptions
        said = [t for t in run.texts if name in t]
        if any(f"loaded {name}" in t for t in said):
            record["loaded"].append(name)
        elif any(REFUSED in t for t in said):
            record["refused"].append(name)
            record["messages"].append(next(t for t in said if REFUSED in t))
        else:
            record["errors"].append(f"{name}: neither loaded nor refused ({said[:2]})")


async def _revisit(k: int, rec: dict, mismatches: list[str]) -> set[str]:
    """Visitor ``k`` comes back: the visitor uploads its sidebar lists. Told that its uploads were released
    (``rec["told"]``), it must list none; nothing else may take a visitor's adapters."""
    run = await rec["session"].visit("", timeout=120)
    names = {n for n in sidebar_names(run.texts) if n.startswith("visitor")}
    if any("were released after" in t for t in run.texts):
        rec["told"] = True
        if names:
            mismatches.append(f"visitor {k}: told its uploads were released, still lists {sorted(names)}")
    return names


async def _scenario(url: str, pid: int, sessions: int, uploads: int, mb: float, idle: float) -> dict:
    zips = [[adapter_zip(100 * k + j, mb) for j in range(uploads)] for k in range(sessions)]
    offered = sum(len(z) for row in zips for z in row)
    out: dict = {}
    # warm: one visitor uploads one small adapter and leaves, so that every import of the upload path and the
    # sample set are in (the baseline is a server that has served an upload, not a cold one)
    from bench.st_protocol import Session

    warm = await Session.open(url)
    await warm.visit("", timeout=180)
    await warm.upload([("warmup.zip", adapter_zip(7, 0.1))], timeout=180)
    await warm.close()
    from bench.soak import wait_until_idle

    await asyncio.get_running_loop().run_in_executor(None, wait_until_idle, pid)  # UMAP's warm-up compile done
    before = rss_bytes(pid)
    t0 = time.perf_counter()
    with RssWatch(pid) as watch:
        await asyncio.gather(*(_visitor(url, k, zips[k], out) for k in range(sessions)))
        # 1. held: each visitor's set is what it was told
        mismatches: list[str] = []
        for k, rec in out.items():
            # told of a release: idle past the stated time while the others were still uploading (a slow machine)
            names = await _revisit(k, rec, mismatches)
            if not rec.get("told") and names != set(rec["loaded"]):
                mismatches.append(f"visitor {k}: sidebar {sorted(names)} != loaded {sorted(rec['loaded'])}")
        upload_seconds = time.perf_counter() - t0
        stages = {"after the uploads": rss_bytes(pid), "peak during the uploads": watch.peak}
        # 2. expiry: everyone idle past the stated time, then a newcomer's upload releases their uploads
        await asyncio.sleep(idle + 1.0)
        newcomer: dict = {}
        await _visitor(url, sessions, [adapter_zip(9999, mb)], newcomer)
        kept_after = []
        for k, rec in out.items():
            await _revisit(k, rec, mismatches)
            if rec["loaded"] and not rec.get("told"):
                kept_after.append(k)
        told = sum(1 for rec in out.values() if rec.get("told"))
        peak = watch.peak
        stages["after the expiry"] = rss_bytes(pid)
    for rec in [*out.values(), *newcomer.values()]:
        await rec["session"].close()
    loaded = sum(len(z) for k, rec in out.items() for j, z in enumerate(zips[k]) if f"visitor{k}x{j}" in rec["loaded"])
    return {"sessions": sessions, "uploads per session": uploads, "upload MB": mb,
            "bytes offered": offered, "bytes loaded (zips accepted)": loaded,
            "uploads loaded": sum(len(r["loaded"]) for r in out.values()),
            "refusals": sum(len(r["refused"]) for r in out.values()),
            "errors": [e for r in out.values() for e in r["errors"]] + newcomer[sessions]["errors"],
            "mismatches": mismatches, "refusal message": next((m for r in out.values() for m in r["messages"]), ""),
            "newcomer loaded": bool(newcomer[sessions]["loaded"]),
            "sessions told of the release": told, "sessions with uploads not released": kept_after,
            "sessions without uploads": sum(1 for r in out.values() if not r["loaded"]),
            "rss before (bytes)": before, "rss peak (bytes)": peak, "rss by stage (bytes)": stages, "seconds": upload_seconds}


def run(sessions: int = 8, uploads: int = 6, mb: float = 16.0, budget: str = "200M", idle: float = 15.0,
        margin: float = 0.1, work: Path | None = None, server_env: dict | None = None) -> dict:
    """Start the demo server, run the scenario, stop it; the figures with ``ok``: no error, every visitor's set
    as it was told, the newcomer loaded, every idle visitor with uploads told of their release, and the peak RSS
    over the served server's within the budget + the uploads in flight (one per visitor) + ``margin`` x budget +
    32 MiB. The server runs with glibc's allocator told to return freed memory (:data:`MALLOC_ENV`, as the
    Dockerfile sets it)."""
    from bench.browser_latency import streamlit_server
    from ui.memory import parse_bytes

    work = Path(work or tempfile.mkdtemp(prefix="atlas-pressure-"))
    samples = write_samples(work / "samples")
    env = {**MALLOC_ENV, "ADAPTER_ATLAS_DEMO": "1", "ADAPTER_ATLAS_MEMORY_BUDGET": budget,
           "ADAPTER_ATLAS_IDLE_RELEASE_S": str(idle), **(server_env or {})}
    with streamlit_server(samples, work / "cache", env=env) as url:
        result = asyncio.run(_scenario(url, url.pid, sessions, uploads, mb, idle))
    limit = parse_bytes(budget)
    result["budget (bytes)"] = limit
    result["rss growth (bytes)"] = result["rss peak (bytes)"] - result["rss before (bytes)"]
    # Streamlit holds each upload's raw bytes from its HTTP PUT until the script reads it: one file per visitor
    # uploading at once is in flight outside any budget (Streamlit's server.maxUploadSize bounds each)
    result["in flight (bytes)"] = int(sessions * mb * 2**20)
    result["allowed growth (bytes)"] = int(limit + result["in flight (bytes)"] + margin * limit + 32 * 2**20)
    result["ok"] = result["rss growth (bytes)"] <= result["allowed growth (bytes)"] and not result["errors"] \
        and not result["mismatches"] and result["newcomer loaded"] and not result["sessions with uploads not released"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_pressure", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--uploads", type=int, default=6)
    p.add_argument("--mb", type=float, default=16.0)
    p.add_argument("--budget", default="200M")
    p.add_argument("--idle", type=float, default=15.0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = run(args.sessions, args.uploads, args.mb, args.budget, args.idle)
    mib = 2**20
    print(f"{result['sessions']} sessions x {result['uploads per session']} uploads of ~{result['upload MB']:g} MB: "
          f"offered {result['bytes offered'] / mib:.0f} MiB, loaded {result['uploads loaded']} uploads "
          f"({result['bytes loaded (zips accepted)'] / mib:.0f} MiB), refused {result['refusals']}, "
          f"errors {len(result['errors'])}, mismatches {len(result['mismatches'])}")
    print(f"budget {result['budget (bytes)'] / mib:.0f} MiB; server RSS before {result['rss before (bytes)'] / mib:.0f} "
          f"MiB, peak {result['rss peak (bytes)'] / mib:.0f} MiB (growth {result['rss growth (bytes)'] / mib:.0f} MiB, "
          f"allowed {result['allowed growth (bytes)'] / mib:.0f} MiB: budget + {result['in flight (bytes)'] / mib:.0f} "
          "MiB of uploads in flight + 10 % + 32 MiB); "
          f"after the idle time: {result['sessions told of the release']} sessions told their uploads were released, "
          f"newcomer loaded: {result['newcomer loaded']}")
    print("server RSS by stage: " + ", ".join(f"{k} {v / mib:.0f} MiB" for k, v in result["rss by stage (bytes)"].items()))
    for line in result["errors"][:5] + result["mismatches"][:5]:
        print("  !", line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print("ok" if result["ok"] else "NOT ok")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
