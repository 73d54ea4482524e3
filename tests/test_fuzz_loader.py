"""Seeded mutation fuzzing of the loader: thousands of damaged safetensors files, configs, zips and
torch ``.bin`` files (zip and legacy formats).

Every mutation of a valid small adapter (2 modules, r=2, 16x16) must either load or raise an
AtlasError whose message is one line starting with the file it is about; any other exception, or
one load doing unbounded work (more than :data:`MAX_CALLS` Python function calls, or more than
:data:`MAX_INFLATED` bytes inflated from a zip: a valid load needs a few hundred calls and a few KB),
fails the test with the mutation that caused it (target, index, seed, kind, offset), so that it can
be replayed with :func:`mutate`. The work is counted, not timed: the verdict does not depend on the
machine or its load.
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import sys
import zipfile

import pytest
import torch
from safetensors.torch import save

from geometry.errors import AtlasError
from geometry.io.loader import load_files, load_zip_bytes

SEED = 1234
#: Mutations per target (9,000 in all; about 0.3 ms each here, so a few seconds).
COUNTS = {"safetensors": 3000, "config": 1500, "zip": 3000, "bin": 1500}
#: Python function calls one load may make before it counts as a hang (a valid load makes at most ~400).
MAX_CALLS = 20_000
#: Bytes one load may inflate from a zip (the inputs are a few KB; a bomb would inflate gigabytes).
MAX_INFLATED = 8 << 20

P = "base_model.model.model.layers.0.self_attn."
CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
       "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 8}, "task_type": "CAUSAL_LM",
       "base_model_name_or_path": "tiny/base", "use_rslora": False}
CONF, ST = "adapter_config.json", "adapter_model.safetensors"


def _valid() -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(0)
    tensors = {P + f"{m}_proj.lora_{ab}.weight": torch.randn(*(2, 16) if ab == "A" else (16, 2), generator=g)
               for m in "qv" for ab in "AB"}
    return json.dumps(CFG, indent=1).encode(), save(tensors)


CONFIG_BYTES, ST_BYTES = _valid()


def _bin(zip_format: bool) -> bytes:
    from safetensors.torch import load

    buf = io.BytesIO()
    torch.save(load(ST_BYTES), buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


BINS = {"zip-format": _bin(True), "legacy": _bin(False)}


def _zip(method: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        zf.writestr("my_adapter/" + CONF, CONFIG_BYTES)
        zf.writestr("my_adapter/" + ST, ST_BYTES)
    return buf.getvalue()


ZIPS = {"deflate": _zip(zipfile.ZIP_DEFLATED), "stored": _zip(zipfile.ZIP_STORED)}


def _digit_spans(data: bytes, lo: int, hi: int) -> list[int]:
    return [m.start() for m in re.finditer(rb"[0-9]", data[lo:hi])]


def mutate(data: bytes, rng: random.Random, json_span: tuple[int, int] | None) -> tuple[bytes, str]:
    """One random mutation of ``data`` and its description; ``json_span``: where digits may be edited."""
    kinds = ["flip", "flip", "drop", "insert", "truncate", "overwrite"] + (["digit"] * 4 if json_span else [])
    kind = rng.choice(kinds)
    if kind == "digit":
        digits = _digit_spans(data, *json_span)
        if digits:
            off = json_span[0] + rng.choice(digits)
            new = rng.choice([str(rng.randrange(10)), str(rng.randrange(10**6)), "-1", "", "99999999999999999999",
                              "1e308", "0", "2", "-", "."]).encode()
            return data[:off] + new + data[off + 1 :], f"digit at offset {off} -> {new!r}"
        kind = "flip"
    off = rng.randrange(len(data))
    if kind == "flip":
        bit = rng.randrange(8)
        out = bytearray(data)
        out[off] ^= 1 << bit
        return bytes(out), f"flip bit {bit} at offset {off}"
    if kind == "drop":
        n = rng.randint(1, 16)
        return data[:off] + data[off + n :], f"drop {n} bytes at offset {off}"
    if kind == "insert":
        ins = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return data[:off] + ins + data[off:], f"insert {ins!r} at offset {off}"
    if kind == "overwrite":
        ins = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return data[:off] + ins + data[off + len(ins) :], f"overwrite {ins!r} at offset {off}"
    return data[:off], f"truncate to {off} bytes"


_VALUES = [None, True, False, 0, -1, 1, 2, 3, 2.5, 1e308, float("inf"), float("nan"), "", "LORA", "IA3", "x",
           [], [1], ["q_proj"], {}, {"q_proj": 0}, {"(": 2}, {"q_proj": "2"}, [[[]]], 10**30, -(10**30)]
_DTYPES = ["F16", "BF16", "F32", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X"]


def mutate_config_json(rng: random.Random) -> tuple[bytes, str]:
    """Replace, drop or add one field of the config with a value of another type."""
    cfg = json.loads(CONFIG_BYTES)
    key = rng.choice(sorted(cfg) + ["enable_lora", "use_dora", "fan_in_fan_out", "modules_to_save"])
    op = rng.choice(["set", "set", "drop"])
    if op == "drop":
        cfg.pop(key, None)
        return json.dumps(cfg).encode(), f"json: drop {key!r}"
    value = rng.choice(_VALUES)
    cfg[key] = value
    return json.dumps(cfg).encode(), f"json: set {key!r} = {value!r}"


def mutate_st_header(rng: random.Random) -> tuple[bytes, str]:
    """Rewrite one field of one tensor entry of the safetensors header (its length kept right)."""
    n = struct.unpack("<Q", ST_BYTES[:8])[0]
    header, body = json.loads(ST_BYTES[8 : 8 + n]), ST_BYTES[8 + n :]
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    field = rng.choice(["dtype", "shape", "data_offsets", "name"])
    entry = dict(header[key])
    if field == "dtype":
        entry["dtype"] = value = rng.choice(_DTYPES)
    elif field == "shape":
        entry["shape"] = value = rng.choice([[16, 2], [2, 16], [32], [4, 8], [2, 8, 2], [64, 1], [1, 64], [], [0, 16],
                                             [2, 16, 1], [8, 2], [16, 1], [128]])
    elif field == "data_offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = value = rng.choice([[a, b], [b, a], [0, b - a], [a, a], [a + 1, b + 1], [a, b * 2]])
    else:
        new = rng.choice([key.replace("lora_A", "lora_B"), key.replace("lora_B", "lora_A"), key + "x", "",
                          key.replace("q_proj", "v_proj"), key.replace(".weight", ".default.weight"),
                          key.replace("layers.0", "layers.99999999999999999999"), "base_model.model.lora_A.weight"])
        header[new] = header.pop(key)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + body, f"header: rename {key} -> {new!r}"
    header[key] = entry
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body, f"header: {key}.{field} = {value!r}"


def _st_json_span(data: bytes) -> tuple[int, int]:
    return 8, 8 + struct.unpack("<Q", data[:8])[0]


def _cases(target: str):
    """(description, loader call, label its message must start with) per mutation of ``target``."""
    for i in range(COUNTS[target]):
        rng = random.Random(f"{SEED}:{target}:{i}")
        if target == "safetensors":
            if rng.random() < 0.3:
                data, what = mutate_st_header(rng)
            else:
                data, what = mutate(ST_BYTES, rng, _st_json_span(ST_BYTES))
            yield (f"{target} #{i} (seed {SEED}): {what}",
                   lambda d=data: load_files({CONF: CONFIG_BYTES, ST: d}), (ST,))
        elif target == "config":
            if rng.random() < 0.3:
                data, what = mutate_config_json(rng)
            else:
                data, what = mutate(CONFIG_BYTES, rng, (0, len(CONFIG_BYTES)))
            yield (f"{target} #{i} (seed {SEED}): {what}",
                   lambda d=data: load_files({CONF: d, ST: ST_BYTES}), (CONF, ST))  # ST: rank mismatch
        elif target == "bin":
            flavour = rng.choice(sorted(BINS))
            data, what = mutate(BINS[flavour], rng, None)
            yield (f"{target} #{i} ({flavour}, seed {SEED}): {what}",
                   lambda d=data: load_files({CONF: CONFIG_BYTES, "adapter_model.bin": d}), ("adapter_model.bin",))
        else:
            flavour = rng.choice(sorted(ZIPS))
            base = ZIPS[flavour]
            span = None
            if flavour == "stored":  # the safetensors header lies as-is inside a stored zip
                at = base.index(b'{"', base.index(ST.encode()))
                span = (at, at + 200)
            data, what = mutate(base, rng, span)
            yield (f"{target} #{i} ({flavour}, seed {SEED}): {what}",
                   lambda d=data: load_zip_bytes(d, source="fuzz.zip"), ("fuzz.zip",))


class _Hang(BaseException):
    """Raised by the call counter inside the load (a BaseException: no ``except Exception`` hides it)."""


class _Work:
    """Counts one load's Python function calls (a profile hook that stops the load past ``MAX_CALLS``)
    and the bytes it inflates from zips (each chunk ``zipfile`` decompresses passes its CRC update)."""

    def __init__(self, monkeypatch):
        self.calls = self.inflated = 0
        real = zipfile.ZipExtFile._update_crc

        def update_crc(fh, data):  # every inflated chunk passes here, also one whose CRC then fails
            self.inflated += len(data)
            return real(fh, data)

        monkeypatch.setattr(zipfile.ZipExtFile, "_update_crc", update_crc)

    def _profile(self, frame, event, arg):
        if event == "call":
            self.calls += 1
            if self.calls > MAX_CALLS:
                raise _Hang()

    def run(self, call):
        self.calls = self.inflated = 0
        sys.setprofile(self._profile)
        try:
            return call()
        finally:
            sys.setprofile(None)


@pytest.mark.parametrize("target", sorted(COUNTS))
def test_mutations_load_or_raise_atlas_error(target, monkeypatch):
    failures, outcomes, most = [], {"loaded": 0, "refused": 0}, {"calls": (0, ""), "inflated": (0, "")}
    work = _Work(monkeypatch)
    for what, call, labels in _cases(target):
        try:
            work.run(call)
            outcomes["loaded"] += 1
        except _Hang:
            pass  # reported below, with the count
        except AtlasError as exc:
            outcomes["refused"] += 1
            msg = str(exc)
            if not msg.startswith(labels) or "\n" in msg or len(msg) > 600:
                failures.append(f"{what}: unclear message {msg!r}")
        except Exception as exc:  # the point of the test: name the mutation
            failures.append(f"{what}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
        if work.calls > MAX_CALLS:
            failures.append(f"{what}: no answer after {MAX_CALLS} Python calls")
        if work.inflated > MAX_INFLATED:
            failures.append(f"{what}: inflated {work.inflated} bytes")
        most = {"calls": max(most["calls"], (work.calls, what)), "inflated": max(most["inflated"], (work.inflated, what))}
    assert not failures, f"{len(failures)} of {COUNTS[target]} mutations failed:\n" + "\n".join(failures[:25])
    assert outcomes["refused"] > COUNTS[target] // 3, outcomes  # the mutations really damage the input
    assert most["calls"][0] > 10, most  # the counter saw the loads (a hook that never ran would pass anything)
