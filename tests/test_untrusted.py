"""Every upload is untrusted: each hostile input below ends in AdapterLoadError with one specific
sentence (file, member / tensor / field, what was expected), never another exception, a hang, a
bomb's worth of memory, or code run from the file."""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
import tomllib
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

import geometry.io.config as gconfig
from geometry.adapter_set import AdapterSet
from geometry.errors import AdapterLoadError, AtlasError
from geometry.io.limits import DEMO, DEMO_ENV, NORMAL, Limits, limits
from geometry.io.loader import load_adapter, load_files, load_zip_bytes

ROOT = Path(__file__).resolve().parents[1]
P = "base_model.model.model.layers.0.self_attn."
QA, QB, VA, VB = (P + "q_proj.lora_A.weight", P + "q_proj.lora_B.weight", P + "v_proj.lora_A.weight",
                  P + "v_proj.lora_B.weight")
CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
       "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny/base"}
ST = "adapter_model.safetensors"
CONF = "adapter_config.json"


def _tensors(**over) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {QA: torch.randn(2, 16, generator=g), QB: torch.randn(16, 2, generator=g),
         VA: torch.randn(2, 16, generator=g), VB: torch.randn(16, 2, generator=g)}
    t.update(over)
    return {k: v for k, v in t.items() if v is not None}


def _st(tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in (_tensors() if tensors is None else tensors).items()})


def _cfg(**over) -> bytes:
    cfg = {**CFG, **over}
    return json.dumps({k: v for k, v in cfg.items() if v is not ...}).encode()


def _load(config: bytes | None = None, weights: bytes | None = None, wname: str = ST):
    return load_files({CONF: _cfg() if config is None else config, wname: _st() if weights is None else weights})


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _adapter_members(prefix: str = "") -> dict[str, bytes]:
    return {prefix + CONF: _cfg(), prefix + ST: _st()}


def _raises(fn, *words: str) -> str:
    with pytest.raises(AdapterLoadError) as err:
        fn()
    msg = str(err.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "\n" not in msg, msg  # one sentence, no traceback-like pages
    return msg


def test_the_valid_adapter_loads():
    a = _load()
    assert len(a.modules) == 2 and all(m.r == 2 for m in a.modules.values())
    assert load_zip_bytes(_zip(_adapter_members("x/"))).name == "x"


# --- 1. pickles that carry code ------------------------------------------------------------------


class _OpenFile:
    path = ""

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


class _System:
    path = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip-format", "legacy-format"])
@pytest.mark.parametrize("payload", [_OpenFile, _System], ids=["builtins.open", "os.system"])
def test_bin_pickle_carrying_code_never_runs(tmp_path, zip_format, payload):
    target = tmp_path / "pwned"
    evil = payload()
    evil.path = str(target)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / CONF).write_bytes(_cfg())
    torch.save({QA: torch.ones(2, 16), "x": evil}, folder / "adapter_model.bin",
               _use_new_zipfile_serialization=zip_format)
    assert not target.exists()
    func = "open" if payload is _OpenFile else "system"  # pickled as io.open / posix.system
    _raises(lambda: load_adapter(folder), "adapter_model.bin", "cannot read as torch pickle", func, "not a tensor")
    assert not target.exists()
    # the same file as an upload pair and inside a zip
    data = (folder / "adapter_model.bin").read_bytes()
    _raises(lambda: _load(weights=data, wname="adapter_model.bin"), "adapter_model.bin", func)
    _raises(lambda: load_zip_bytes(_zip({CONF: _cfg(), "adapter_model.bin": data})), "adapter_model.bin", func)
    assert not target.exists()


def _bin(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "obj, words",
    [
        ([torch.ones(2)], ["holds a value of type list", "mapping of tensor names"]),
        ({1: torch.ones(2, 16)}, ["key 1 (of type int) is not a tensor name"]),
        ({QA: 3}, [QA, "of type int", "expected a tensor"]),
        ({QA: torch.ones(2, 16).to_sparse(), QB: torch.ones(16, 2)}, [QA, "sparse_coo", "dense"]),
    ],
    ids=["list", "int-key", "non-tensor", "sparse"],
)
def test_bin_that_is_not_a_tensor_dict(obj, words):
    _raises(lambda: _load(weights=_bin(obj), wname="adapter_model.bin"), "adapter_model.bin", *words)


def test_bin_garbage_and_truncated():
    good = _bin(_tensors())
    _raises(lambda: _load(weights=b"\x80\x02garbage", wname="adapter_model.bin"),
            "adapter_model.bin: cannot read as torch pickle")
    _raises(lambda: _load(weights=good[: len(good) // 2], wname="adapter_model.bin"),
            "adapter_model.bin: cannot read as torch pickle")


def test_bin_torch_archive_with_a_compressed_bomb_record_is_refused_before_torch_load():
    good = zipfile.ZipFile(io.BytesIO(_bin(_tensors())))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info in good.infolist():
            out.writestr(info, good.read(info))
        prefix = good.infolist()[0].filename.split("/")[0]
        out.writestr(f"{prefix}/data/99", b"\0" * (8 << 20), compress_type=zipfile.ZIP_DEFLATED)
    _raises(lambda: _load(weights=buf.getvalue(), wname="adapter_model.bin"),
            "adapter_model.bin", "torch archive record", "data/99", ":1), more than the 200:1 allowed")


# --- 2. safetensors -------------------------------------------------------------------------------


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _edit(entry: str, **fields) -> bytes:
    header, body = _header(_st())
    header[entry] = {**header[entry], **fields}
    return _with_header(header, body)


def _st_cases():
    good = _st()
    header, body = _header(good)
    a_off = header[QA]["data_offsets"]
    corrupted = bytearray(good)
    corrupted[8:40] = b"\xff" * 32
    return [
        ("truncated", good[:-10], ["past the", "truncated file"]),
        ("truncated-in-header", good[:30], ["header length field says", "only 22 follow"]),
        ("empty-file", b"", ["0 bytes, too short"]),
        ("corrupted-header-bytes", bytes(corrupted), ["JSON header is invalid"]),
        ("header-length-2**40", struct.pack("<Q", 2**40) + good[8:], ["1099511627776", "more than safetensors' limit"]),
        ("lies-about-shape", _edit(QA, shape=[3, 16]), [QA, "shape [3, 16]", "span 128 bytes"]),
        ("lies-about-offsets", _edit(QA, data_offsets=[0, 10**12]), [QA, "data_offsets [0, 1000000000000]"]),
        ("offsets-past-the-end", _edit(QA, data_offsets=[10**6, 10**6 + 128]), [QA, "past the"]),
        ("overlapping-offsets", _edit(QB, data_offsets=[a_off[0] + 64, a_off[1] + 64]), ["without gaps or overlaps"]),
        ("negative-shape", _edit(QA, shape=[-2, 16]), [QA, "shape [-2, 16]", "non-negative integers"]),
        ("unknown-dtype", _edit(QA, dtype="F33"), [QA]),
        ("header-not-object", _with_header([1, 2], body), ["JSON header is a list"]),  # type: ignore[arg-type]
        ("shape-overflow", _edit(QA, shape=[2**40, 2**40]), [QA, "shape"]),
    ]


@pytest.mark.parametrize("data, words", [c[1:] for c in _st_cases()], ids=[c[0] for c in _st_cases()])
def test_broken_safetensors(data, words):
    _raises(lambda: _load(weights=data), f"{ST}: cannot read as safetensors", *words)


def _nan(shape):
    return torch.full(shape, float("nan"))


@pytest.mark.parametrize(
    "over, words",
    [
        ({QA: _nan((2, 16))}, [QA, "NaN or Inf"]),
        ({VB: torch.full((16, 2), float("inf"))}, [VB, "NaN or Inf"]),
        ({QB: torch.full((16, 2), -float("inf"), dtype=torch.float16)}, [QB, "NaN or Inf"]),
        ({QB: torch.randn(16, 3)}, [QA, QB, "rank 2", "rank 3", "the same r"]),
        ({QA: torch.ones(3, 16), QB: torch.ones(16, 3)}, [QA, "rank 3", "r=2"]),
        ({QA: torch.ones(0, 16), QB: torch.ones(16, 0)}, [QA, "(0, 16)", "empty factor", "rank 0"]),
        ({QA: torch.ones(2, 0)}, [QA, "(2, 0)", "empty factor"]),
        ({QA: torch.ones(2, 16, dtype=torch.int64)}, [QA, "torch.int64", "floating-point lora_A"]),
        ({QB: torch.ones(16, 2, dtype=torch.int32)}, [QB, "torch.int32", "floating-point lora_B"]),
        ({QA: torch.ones(2, 16, dtype=torch.bool)}, [QA, "torch.bool"]),
        ({QA: torch.ones(2, 16, dtype=torch.complex64)}, [QA, "torch.complex64"]),
        ({QA: torch.ones(2, 16).to(torch.float8_e4m3fn)}, [QA, "torch.float8_e4m3fn"]),
        ({QA: torch.ones(32)}, [QA, "2-D (r, in_features)"]),
        ({QB: None}, [QA, "no lora_B"]),
        ({P + "q_proj.lora_A.default.weight": torch.ones(2, 16)}, ["q_proj has two lora_A tensors"]),
        ({P + "v_proj.lora_A.other.weight": torch.ones(2, 16), P + "v_proj.lora_B.other.weight": torch.ones(16, 2),
          VA: None, VB: None, P + "q_proj.lora_A.default.weight": torch.ones(2, 16), QA: None,
          P + "q_proj.lora_B.default.weight": torch.ones(16, 2), QB: None}, ["several adapters", "default, other"]),
        ({"base_model.model.score.weight": _nan((2, 2))}, ["score.weight", "NaN or Inf"]),
        ({P + "q_proj.lora_magnitude_vector": torch.ones(16, dtype=torch.int64)}, ["lora_magnitude_vector", "int64"]),
    ],
    ids=["nan-A", "inf-B", "fp16-inf", "ranks-do-not-chain", "rank-vs-config", "rank-0", "in-features-0",
         "int64-A", "int32-B", "bool", "complex", "float8", "1-D", "missing-B", "two-A-one-module",
         "two-adapter-names", "nan-in-head", "int-dora-magnitude"],
)
def test_bad_tensors(over, words):
    _raises(lambda: _load(weights=_st(_tensors(**over))), ST, *words)


def test_no_lora_tensors_at_all():
    _raises(lambda: _load(weights=_st({})), ST, "no LoRA tensors")
    _raises(lambda: _load(weights=_st({"base_model.model.score.weight": torch.ones(2, 2)})), ST, "no LoRA tensors")


def test_float8_other_tensor_is_checked_not_crashed():
    """isfinite is not implemented for float8: the check converts instead of raising NotImplementedError."""
    a = _load(weights=_st(_tensors(**{"base_model.model.score.weight": torch.ones(2, 2).to(torch.float8_e5m2)})))
    assert "base_model.model.score.weight" in a.other_tensors


def test_duplicate_adapter_names_in_a_set_are_renamed_not_merged():
    """AdapterSet.add never holds two adapters under one name: the second becomes 'name-2'."""
    a, b = _load(), _load()
    s = AdapterSet([a, b])
    assert s.names == ["adapter", "adapter-2"] and len(s) == 2
    with pytest.raises(ValueError, match="already in the set"):
        s.rename("adapter-2", "adapter")


# --- 3. config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, words",
    [
        (b"{not json", ["invalid JSON"]),
        (b"\xff\xfe{}", ["invalid JSON", "not UTF-8"]),
        (b"", ["invalid JSON"]),
        (b"[1, 2]", ["expected a JSON object, got list"]),
        (b'"LORA"', ["expected a JSON object, got str"]),
        (b"[" * 100_000 + b"]" * 100_000, ["invalid JSON", "nested too deeply"]),
        (b'{"r": ' + b"9" * 5000 + b"}", ["invalid JSON", "digits"]),
        (_cfg(peft_type="PREFIX_TUNING"), ["peft_type is 'PREFIX_TUNING'", "only LoRA"]),
        (_cfg(peft_type="IA3"), ["peft_type is 'IA3'"]),
        (_cfg(peft_type="VERA"), ["peft_type is 'VERA'", "LoHa and LoKr"]),
        (_cfg(peft_type=["LORA"]), ["'peft_type' must be a string"]),
        (_cfg(r=0), ["'r' must be a positive integer, got 0"]),
        (_cfg(r=-2), ["'r' must be a positive integer, got -2"]),
        (_cfg(r=2.5), ["'r' must be a positive integer, got 2.5"]),
        (_cfg(r="2"), ["'r' must be a number, got '2'"]),
        (_cfg(r=True), ["'r' must be a number, got True"]),
        (b'{"peft_type": "LORA", "r": Infinity}', ["'r' must be a finite number, got inf"]),
        (b'{"peft_type": "LORA", "r": NaN}', ["'r' must be a finite number, got nan"]),
        (b'{"peft_type": "LORA", "r": 1e400}', ["'r' must be a finite number"]),
        (b'{"peft_type": "LORA", "r": 2, "lora_alpha": -Infinity}', ["'lora_alpha' must be a finite number"]),
        (b'{"peft_type": "LORA", "r": 2, "rank_pattern": {"q_proj": Infinity}}', ["rank_pattern['q_proj']", "finite"]),
        (_cfg(rank_pattern={"q_proj": 0}), ["rank_pattern['q_proj']", "positive integer"]),
        (_cfg(rank_pattern={"(": 2}), ["rank_pattern key '('", "regular expression"]),
        (_cfg(rank_pattern={f"m{i}": 2 for i in range(gconfig.MAX_PATTERN_KEYS + 1)}), ["10001 keys", "limit"]),
        (_cfg(base_model_name_or_path=5), ["'base_model_name_or_path' must be a string or null, got 5"]),
        (_cfg(task_type={"x": 1}), ["'task_type' must be a string or null"]),
        (_cfg(use_rslora="false"), ["'use_rslora' must be true or false, got 'false'"]),
        (_cfg(target_modules=3), ["target_modules must be a list"]),
        (_cfg(r=...), ["has no 'r' field", "default r=8", '"r": 2']),
        (_cfg(r=None, rank_pattern={"q_proj": 2}), [VA, "has no 'r' field"]),
        (_cfg(enable_lora=[True] + [False] * 1_000_000), ["enable_lora", "has 1000001 entries", "at most 8"]),
        (_cfg(enable_lora=[True, "x", 1]), ["enable_lora=[True, 'x', 1]", "true / false values"]),
        (b" " * (16 * 1024**2 + 1), ["more than the 16777216 bytes a LoRA config can need"]),
    ],
)
def test_bad_configs(config, words):
    weights = _st()
    if b"enable_lora" in config:  # legacy merged-LoRA layout: B is a grouped Conv1d weight (3-D)
        weights = _st({P + "q_proj.lora_A.weight": torch.ones(2, 16), P + "q_proj.lora_B.weight": torch.ones(16, 2, 1)})
    _raises(lambda: _load(config=config, weights=weights), CONF if words[0] != VA else ST, *words)


def test_config_without_r_but_matching_weights_loads_with_peft_default():
    """peft's LoraConfig defaults r to 8: a config lacking "r" is valid when the factors have rank 8."""
    g = torch.Generator().manual_seed(0)
    a = _load(config=_cfg(r=...), weights=_st({QA: torch.randn(8, 16, generator=g), QB: torch.randn(16, 8, generator=g)}))
    assert a.config.r == 8


def test_rank_pattern_that_backtracks_under_re_does_not_hang(monkeypatch):
    """``(a*)*b`` against a name of 30 'a' takes minutes under re: a key that can backtrack goes to the
    regex package, and each of its matches runs under the loader's time limit (a match over the limit
    is a load error, so loading at all proves none ran away). Counted here: which engine, how many
    matches, each with its limit."""
    name = "a" * 30
    tensors = {f"base_model.model.{name}.lora_A.weight": torch.ones(2, 16),
               f"base_model.model.{name}.lora_B.weight": torch.ones(16, 2)}
    keys = {"(a*)*b": 4, "(.*)(.*)(.*)(.*)(.*)(.*)x": 4}
    real, matches = gconfig._compiled, []

    class Counted:
        def __init__(self, key, pattern):
            self.key, self.pattern = key, pattern

        def match(self, text, **kwargs):
            matches.append((self.key, type(self.pattern).__module__, kwargs.get("timeout")))
            return self.pattern.match(text, **kwargs)

    monkeypatch.setattr(gconfig, "_compiled", lambda key: (Counted(key, real(key)[0]), real(key)[1]))
    a = _load(config=_cfg(rank_pattern=keys), weights=_st(tensors))
    assert next(iter(a.modules.values())).r == 2
    assert {key for key, _, _ in matches} == set(keys) and len(matches) <= len(keys) * len(a.modules)
    regex_engine = type(gconfig._regex.compile("x")).__module__  # the regex package's, not re's
    assert all(engine == regex_engine and limit == gconfig.PATTERN_TIMEOUT_S for _, engine, limit in matches), matches


def test_rank_pattern_timeout_is_a_load_error(monkeypatch):
    class Slow:
        def match(self, name, timeout=None):
            raise TimeoutError("regex timed out")

    monkeypatch.setattr(gconfig, "_compiled", lambda key: (Slow(), True))
    _raises(lambda: _load(config=_cfg(rank_pattern={"(x+)+y": 4})), CONF, "rank_pattern key '(x+)+y'",
            "took more than", "simplify it")


def test_rank_pattern_keys_times_modules_is_capped(monkeypatch):
    monkeypatch.setattr("geometry.io.factors.MAX_PATTERN_MATCHES", 3)
    _raises(lambda: _load(config=_cfg(rank_pattern={"q_proj": 2, "v_proj": 2})), CONF, "2 keys for 2 modules")


# --- 4. zips --------------------------------------------------------------------------------------


def _local_and_central(data: bytes, name: str) -> tuple[int, int]:
    """Offsets of ``name``'s local header and central directory entry in a zip's bytes."""
    nb = name.encode()
    local = next(i for i in _find_all(data, b"PK\x03\x04") if data[i + 30 : i + 30 + len(nb)] == nb)
    central = next(i for i in _find_all(data, b"PK\x01\x02") if data[i + 46 : i + 46 + len(nb)] == nb)
    return local, central


def _find_all(data: bytes, sig: bytes):
    i = data.find(sig)
    while i >= 0:
        yield i
        i = data.find(sig, i + 1)


def _patch(data: bytes, name: str, *, file_size=None, compress_size=None, flags=None, method=None,
           external=None) -> bytes:
    """Rewrite fields of one member in BOTH its local header and its central directory entry."""
    out = bytearray(data)
    local, central = _local_and_central(data, name)
    for base, off in ((local, 0), (central, 2)):  # the central entry has 'version made by' first
        if flags is not None:
            struct.pack_into("<H", out, base + 6 + off, flags)
        if method is not None:
            struct.pack_into("<H", out, base + 8 + off, method)
        if compress_size is not None:
            struct.pack_into("<L", out, base + 18 + off, compress_size)
        if file_size is not None:
            struct.pack_into("<L", out, base + 22 + off, file_size)
    if external is not None:
        struct.pack_into("<L", out, central + 38, external)
    return bytes(out)


def _raw_zip(members: list[tuple[str, int, bytes, int]]) -> bytes:
    """A zip written by hand: ``(name, method, compressed bytes, declared file_size)`` per member; the
    CRC is right for stored members and 0 for the others."""
    out, central = bytearray(), bytearray()
    for name, method, data, file_size in members:
        nb, off = name.encode(), len(out)
        crc = zlib.crc32(data) if method == zipfile.ZIP_STORED else 0
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), file_size, len(nb), 0)
        out += nb + data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(data), file_size,
                               len(nb), 0, 0, 0, 0, 0, off) + nb
    cd = len(out)
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), cd, 0)
    return bytes(out)


def _zero_deflate(mib: int) -> bytes:
    """A raw deflate stream inflating to ``mib`` MiB of zeros, ~1 KB per MiB, built in milliseconds:
    after a full flush the compressor's state is reset, so every 1 MiB block has the same bytes."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(b"\0" * (1 << 20)) + co.flush(zlib.Z_FULL_FLUSH)
    assert co.compress(b"\0" * (1 << 20)) + co.flush(zlib.Z_FULL_FLUSH) == block
    return block * mib + co.flush()


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in _adapter_members().items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _zip_cases():
    members = _adapter_members()
    stored = _zip(members, zipfile.ZIP_STORED)
    deflated = _zip(members)
    flipped_stored = bytearray(stored)
    flipped_stored[_local_and_central(stored, ST)[0] + 30 + len(ST) + 100] ^= 0x01
    flipped_deflated = bytearray(deflated)
    flipped_deflated[_local_and_central(deflated, ST)[0] + 30 + len(ST) + 40] ^= 0x10
    dup = io.BytesIO()
    with zipfile.ZipFile(dup, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        for name, data in [*members.items(), (ST, _st(_tensors(**{QA: torch.zeros(2, 16)})))]:
            zf.writestr(name, data)
    return [
        ("dotdot", _zip({**members, "../x": b"1"}), ["unsafe zip member '../x'", "'..'"]),
        ("dotdot-inside", _zip({**members, "a/../../x": b"1"}), ["'..'"]),
        ("absolute", _zip({**members, "/etc/x": b"1"}), ["'/etc/x'", "absolute path"]),
        ("windows-drive", _zip({**members, "C:/x": b"1"}), ["absolute path"]),
        ("backslash-absolute", _zip({**members, "\\x": b"1"}), ["absolute path"]),
        ("symlink", _symlink_zip(), ["'link'", "symbolic link"]),
        ("duplicate-member", dup.getvalue(), [f"two members named '{ST}'"]),
        ("encrypted", _patch(deflated, ST, flags=0x1), [f"'{ST}' is encrypted"]),
        ("unknown-method", _patch(deflated, ST, method=99), ["compression method 99"]),
        ("flipped-byte-stored", bytes(flipped_stored), [f"zip member '{ST}' is corrupted (bad CRC)"]),
        ("flipped-byte-deflated", bytes(flipped_deflated), [f"zip member '{ST}' is corrupted (invalid compressed data"]),
        ("truncated", deflated[: len(deflated) // 2], ["not a readable zip archive"]),
        ("not-a-zip", b"PK\x03\x04 this is not a zip", ["not a readable zip archive"]),
        ("empty", b"", ["not a readable zip archive"]),
        ("nested-only", _zip({"inner.zip": deflated}), ["only another zip ('inner.zip')", "not unpacked"]),
        ("no-config", _zip({"readme.txt": b"hi"}), ["no adapter_config.json in the zip archive"]),
        ("no-weights", _zip({CONF: _cfg()}), ["no adapter_model.safetensors or adapter_model.bin next to"]),
    ]


@pytest.mark.parametrize("data, words", [c[1:] for c in _zip_cases()], ids=[c[0] for c in _zip_cases()])
def test_hostile_zips(data, words):
    _raises(lambda: load_zip_bytes(data, source="up.zip"), "up.zip: ", *words)


def test_nested_zip_next_to_the_adapter_is_ignored_never_unpacked(monkeypatch):
    inner = _zip({"bomb/" + ST: b"\0" * (4 << 20)})
    outer = _zip({**_adapter_members(), "inner.zip": inner, "more/other.zip": inner})
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: (
        opened.append(getattr(name, "filename", name)), real_open(self, name, *a, **k))[1])
    a = load_zip_bytes(outer)
    assert len(a.modules) == 2 and sorted(opened) == [CONF, ST]


def test_too_many_members_is_refused_before_parsing_the_directory(monkeypatch):
    many = _zip({**_adapter_members(), **{f"pad/{i}.txt": b"" for i in range(30)}})
    _raises(lambda: load_zip_bytes(many, max_members=20), "zip has 32 members, more than the limit of 20")
    parsed = []
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: parsed.append(1))
    _raises(lambda: load_zip_bytes(many, max_members=20), "more than the limit of 20")
    assert parsed == []  # refused from the end record, before ZipFile read the directory


def test_member_count_lie_in_the_end_record_is_still_caught():
    many = bytearray(_zip({**_adapter_members(), **{f"pad/{i}.txt": b"" for i in range(30)}}))
    end = many.rindex(b"PK\x05\x06")
    struct.pack_into("<HH", many, end + 8, 2, 2)  # claims 2 members, the directory holds 32
    _raises(lambda: load_zip_bytes(bytes(many), max_members=20), "zip has 32 members")


def test_huge_zip_directory_is_refused():
    many = _zip({**_adapter_members(), **{f"{'d' * 30_000}/{i}.txt": b"" for i in range(40)}})
    _raises(lambda: load_zip_bytes(many, max_members=45), "zip directory is", "more than the 1048576 bytes that 45")


def test_upload_larger_than_the_limit():
    _raises(lambda: load_zip_bytes(_zip(_adapter_members()), max_upload_bytes=1000), "more than the limit of 1000")
    cap = len(_cfg()) + 1
    assert len(_st()) > cap
    _raises(lambda: load_files({CONF: _cfg(), ST: _st()}, max_upload_bytes=cap), ST, f"upload limit of {cap}")


def test_zip_path_over_the_upload_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.zip"
    path.write_bytes(_zip(_adapter_members()))
    _raises(lambda: load_adapter(path, max_upload_bytes=100), "big.zip: zip archive is", "more than the limit of 100")
    assert len(load_adapter(path).modules) == 2


def test_build_adapter_without_config_or_weights():
    from geometry.io.loader import build_adapter

    _raises(lambda: build_adapter({CONF: _cfg()}, name="x", source="up"), "up: no weights file")
    _raises(lambda: build_adapter({ST: _st()}, name="x", source="up"), "up: no adapter_config.json")


def _bounded(fn, *words, inflated_kib: int = 1024, peak_mib: int = 64) -> str:
    """``_raises(fn, *words)`` having inflated at most ``inflated_kib`` KiB from the zip (every byte
    ``zipfile`` decompressed, counted where it checks the CRC) and allocated at most ``peak_mib`` MiB."""
    real, inflated = zipfile.ZipExtFile._update_crc, []

    def update_crc(fh, data):  # every inflated chunk passes here, also one whose CRC then fails
        inflated.append(len(data))
        return real(fh, data)

    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(zipfile.ZipExtFile, "_update_crc", update_crc)
            msg = _raises(fn, *words)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(inflated) <= inflated_kib << 10, f"inflated {sum(inflated)} bytes"
    assert peak < peak_mib << 20, f"peak {peak >> 20} MiB"
    return msg


def test_zip_bomb_of_3_gib_is_refused_before_inflating():
    stream = _zero_deflate(3 * 1024)  # 3 GiB of zeros in ~3 MB
    bomb = _raw_zip([(CONF, 0, _cfg(), len(_cfg())), (ST, zipfile.ZIP_DEFLATED, stream, 3 << 30)])
    _bounded(lambda: load_zip_bytes(bomb, source="bomb.zip"), f"bomb.zip: zip member '{ST}' would inflate",
             "to 3221225472", "more than the 200:1 allowed")
    # with the ratio check out of the way, the declared total is over the 2 GiB cap
    total = (3 << 30) + len(_cfg())
    _bounded(lambda: load_zip_bytes(bomb, source="bomb.zip", max_ratio=1e9),
             f"zip uncompressed size {total} bytes exceeds the limit of 2147483648")


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_bzip2_and_lzma_bombs_are_refused_by_ratio(method):
    bomb = _zip({**_adapter_members(), "pad.bin": b"\0" * (8 << 20)}, method)
    _bounded(lambda: load_zip_bytes(bomb), "zip member 'pad.bin' would inflate", "more than the 200:1 allowed")


def test_zip_bomb_lying_about_its_size_stops_at_the_declared_size():
    """Headers (local and central) claim 100 KB for a member that really inflates to 3 GiB: the
    reader stops after 100 KB (CRC mismatch), in bounded time and memory, never inflating 3 GiB."""
    stream = _zero_deflate(3 * 1024)
    liar = _raw_zip([(CONF, 0, _cfg(), len(_cfg())), (ST, zipfile.ZIP_DEFLATED, stream, 100_000)])
    _bounded(lambda: load_zip_bytes(liar, source="liar.zip"), f"liar.zip: zip member '{ST}' is corrupted (bad CRC)")


def test_real_zip_with_patched_sizes_stops_at_the_declared_size():
    """A zipfile-written archive whose safetensors member inflates to 32 MiB, its size fields patched to
    say 4096 bytes in both headers: read stops at the claim and the CRC mismatch is reported."""
    real = _zip({CONF: _cfg(), ST: _st() + b"\0" * (32 << 20)})
    liar = _patch(real, ST, file_size=4096)
    _bounded(lambda: load_zip_bytes(liar, source="liar.zip"), f"zip member '{ST}' is corrupted (bad CRC)")
    # and the chunked reader's own budget check, for a member larger than what is left of the budget
    with zipfile.ZipFile(io.BytesIO(real)) as zf:
        from geometry.io.loader import _read_member

        info = zf.getinfo(ST)
        info.file_size = 1000  # the header lies, and budget 2000 is above the claim
        with pytest.raises(AdapterLoadError, match="corrupted|exceeds the size limit"):
            _read_member(zf, info, budget=2000, where="liar.zip")


def test_every_error_is_an_atlas_error():
    assert issubclass(AdapterLoadError, AtlasError)


# --- 5. limits ------------------------------------------------------------------------------------


def test_limits_normal_demo_and_env(monkeypatch):
    monkeypatch.delenv(DEMO_ENV, raising=False)
    assert limits() == NORMAL and limits(demo=True) == DEMO
    assert NORMAL == Limits(1024**3, 2 * 1024**3, 10_000, 200.0)
    assert DEMO.max_upload_bytes == DEMO.max_zip_bytes == 200 * 1024**2 and DEMO.max_zip_members == 1_000
    for value, demo in [("1", True), ("true", True), ("TRUE", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv(DEMO_ENV, value)
        assert limits() == (DEMO if demo else NORMAL), value
    monkeypatch.setenv(DEMO_ENV, "1")
    assert limits(demo=False) == NORMAL
    with pytest.raises(AttributeError):
        NORMAL.max_ratio = 1  # type: ignore[misc]


def test_streamlit_upload_size_matches_the_normal_limit():
    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["maxUploadSize"] * 1024**2 == NORMAL.max_upload_bytes


def test_loader_defaults_follow_the_demo_switch_and_explicit_arguments_win(monkeypatch):
    zipped = _zip({**_adapter_members(), **{f"pad/{i}": b"" for i in range(DEMO.max_zip_members)}})
    monkeypatch.delenv(DEMO_ENV, raising=False)
    assert len(load_zip_bytes(zipped).modules) == 2
    monkeypatch.setenv(DEMO_ENV, "1")
    _raises(lambda: load_zip_bytes(zipped), "1002 members, more than the limit of 1000")
    _raises(lambda: load_adapter(zipped), "more than the limit of 1000")
    assert len(load_zip_bytes(zipped, max_members=5000).modules) == 2
    assert len(load_adapter(zipped, max_members=5000).modules) == 2
    # the demo total: a member claiming 300 MiB (ratio 150:1) is refused before anything is read
    claim = _raw_zip([(CONF, 0, _cfg(), len(_cfg())), (ST, zipfile.ZIP_DEFLATED, b"\0" * (2 << 20), 300 << 20)])
    _raises(lambda: load_zip_bytes(claim), "exceeds the limit of 209715200")
    big = b"\0" * (DEMO.max_upload_bytes + 1)
    _raises(lambda: load_files({CONF: _cfg(), ST: big}), "upload limit of 209715200")
