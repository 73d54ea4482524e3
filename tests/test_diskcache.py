"""On-disk cache: hit, miss, key sensitivity, size cap (LRU eviction), damaged entries recomputed,
writers killed mid-way, concurrent writers of one key."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import warnings

import numpy as np
import pytest

from geometry import diskcache

#: Child processes load geometry/diskcache.py by path (not the ``geometry`` package, which imports torch)
#: and use a fixed code version, as the tests here do through ``fixed_code``.
_CHILD = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("atlas_diskcache", {str(diskcache.__file__)!r})
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)
dc.code_version = lambda *a, **k: "test-code"
import numpy as np
"""


@pytest.fixture
def fixed_code(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path))
    monkeypatch.setattr(diskcache, "code_version", lambda *a, **k: "test-code")
    return tmp_path


def _child(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD + code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _value_files():
    return sorted(diskcache.store_dir().rglob("*.val"))


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "c"))
    assert diskcache.cache_dir() == tmp_path / "c"
    assert diskcache.store_dir() == tmp_path / "c" / "store"
    monkeypatch.delenv("ADAPTER_ATLAS_CACHE")
    assert diskcache.cache_dir() == diskcache.REPO / "cache"


def test_size_limit_from_env(monkeypatch):
    monkeypatch.delenv("ADAPTER_ATLAS_CACHE_MB", raising=False)
    assert diskcache.size_limit() == 2048 * 2**20
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE_MB", "0.5")
    assert diskcache.size_limit() == 2**19
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE_MB", "lots")
    assert diskcache.size_limit() == 2048 * 2**20


def test_cached_computes_once_and_keys_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"values": np.arange(3.0)}

    first = diskcache.cached("ns", ("v1", "hash-a"), compute)
    second = diskcache.cached("ns", ("v1", "hash-a"), compute)
    np.testing.assert_array_equal(first["values"], second["values"])
    assert len(calls) == 1
    diskcache.cached("ns", ("v1", "hash-b"), compute)
    diskcache.cached("other", ("v1", "hash-a"), compute)
    assert len(calls) == 3
    assert diskcache.cache_key(("ab", "c")) != diskcache.cache_key(("a", "bc"))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_store_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "a"))
    assert diskcache.cached("ns", ("k",), lambda: "a") == "a"
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "b"))
    assert diskcache.cached("ns", ("k",), lambda: "b") == "b"
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "a"))
    assert diskcache.cached("ns", ("k",), lambda: "not used") == "a"
    assert (tmp_path / "a" / "store" / "cache.db").is_file()


def test_failing_or_unpicklable_compute_stores_nothing(fixed_code):
    with pytest.raises(KeyError):
        diskcache.cached("ns", ("k",), lambda: {}["missing"])
    assert diskcache.load("ns", ("k",)) is None
    unpicklable = lambda: 1  # noqa: E731
    assert diskcache.cached("ns", ("f",), lambda: unpicklable) is unpicklable
    assert diskcache.store("ns", ("f",), unpicklable) is False
    assert len(diskcache.open_store()) == 0


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete", "row"])
def test_damaged_entry_is_recomputed_and_rewritten(fixed_code, damage):
    big = damage != "row"  # values of 32 KiB or more live in a file, smaller ones in the SQLite row
    good = np.arange(8192.0 if big else 16.0)
    assert diskcache.store("ns", ("k",), good)
    if big:
        (path,) = _value_files()
        data = path.read_bytes()
        if damage == "truncate":  # a half-written file
            path.write_bytes(data[: len(data) // 2])
        elif damage == "overwrite":  # same length, bytes zeroed inside the array: only the digest tells
            mid = len(data) // 2
            path.write_bytes(data[:mid] + bytes(100) + data[mid + 100:])
        else:
            path.unlink()
    else:
        with sqlite3.connect(diskcache.store_dir() / "cache.db") as con:
            (blob,) = con.execute("SELECT value FROM Cache").fetchone()
            con.execute("UPDATE Cache SET value = ?", (bytes(blob[:-8]) + b"garbage!",))
        con.close()
    recomputed = diskcache.cached("ns", ("k",), lambda: good + 1)
    np.testing.assert_array_equal(recomputed, good + 1)
    np.testing.assert_array_equal(diskcache.cached("ns", ("k",), lambda: good), good + 1)
    assert len(diskcache.open_store()) == 1


def test_unwritable_directory_still_returns_the_value(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(blocker))
    assert diskcache.cached("ns", ("k",), lambda: "value") == "value"
    assert diskcache.load("ns", ("k",), "default") == "default"


def test_key_holds_the_code_version(tmp_path, monkeypatch):
    """After the code changes, a cached result is recomputed (the key holds a hash of the source)."""
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path))
    calls = []
    diskcache.cached("ns", ("k",), lambda: calls.append(1) or 1)
    diskcache.cached("ns", ("k",), lambda: calls.append(1) or 1)
    assert len(calls) == 1
    monkeypatch.setattr(diskcache, "code_version", lambda *a, **k: "some-other-code")
    assert diskcache.cached("ns", ("k",), lambda: calls.append(1) or 2) == 2
    assert len(calls) == 2


def test_code_version_follows_source_bytes(tmp_path):
    pkg = tmp_path / "geometry"
    pkg.mkdir()
    (pkg / "m.py").write_text("x = 1\n")
    first = diskcache.code_version(tmp_path)
    assert diskcache.code_version(tmp_path) == first
    diskcache._CODE_VERSION.clear()
    (pkg / "m.py").write_text("x = 2\n")
    assert diskcache.code_version(tmp_path) != first
    assert diskcache.code_version(tmp_path, dirs=("geometry",)) != diskcache.code_version(tmp_path, dirs=("ui",))


def test_size_cap_evicts_least_recently_used(fixed_code, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE_MB", "0.5")
    sizes = []
    for i in range(30):  # 30 entries of ~40 KB (files) against a 512 KiB cap
        assert diskcache.store("ns", (i,), np.full(5000, float(i)))
        assert diskcache.load("ns", (0,)) is not None  # entry 0 stays the most recently used
        sizes.append(len(diskcache.open_store()))
    cache = diskcache.open_store()
    full = max(sizes)
    assert all(n >= full - 1 for n in sizes[full:])  # evicted one at a time (diskcache culls ten)
    assert cache.volume() <= cache.size_limit == 2**19
    assert 5 < len(cache) < 30
    assert len(_value_files()) == len(cache)  # evicted entries' files are gone too
    assert all(diskcache.load("ns", (i,)) is None for i in range(1, 10))
    for i in (0, 28, 29):
        np.testing.assert_array_equal(diskcache.load("ns", (i,)), np.full(5000, float(i)))


_KILLED_WRITER = """
import os
import diskcache.core as core

def pause(message):
    print(message, flush=True)
    time.sleep(60)

if sys.argv[1] == "file":  # half the value file written, then killed
    def _write(self, full_path, iterator, mode, encoding=None):
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        with open(full_path, mode) as fh:
            chunk = next(iter(iterator))
            fh.write(chunk[: len(chunk) // 2])
            fh.flush()
            pause("writing")
    core.Disk._write = _write
else:  # file written, the row inserted, killed before the SQLite transaction commits
    core.Cache._cull = lambda self, *a, **k: pause("committing")
dc.store("ns", ("big",), np.arange(2**20, dtype=float))
"""


@pytest.mark.parametrize("where", ["file", "commit"])
def test_writer_killed_mid_way_leaves_the_cache_usable(fixed_code, where):
    old = np.arange(10.0)
    assert diskcache.store("ns", ("big",), old)
    assert diskcache.store("ns", ("other",), "kept")
    proc = _child(_KILLED_WRITER, where)
    try:
        assert proc.stdout.readline().strip() in ("writing", "committing")
        proc.kill()  # SIGKILL
        proc.wait(10)
    finally:
        proc.kill()
    np.testing.assert_array_equal(diskcache.load("ns", ("big",)), old)  # the earlier entry is intact
    assert diskcache.load("ns", ("other",)) == "kept"
    new = np.arange(2.0**16)
    assert diskcache.cached("ns", ("fresh",), lambda: new) is new
    np.testing.assert_array_equal(diskcache.load("ns", ("fresh",)), new)
    cache = diskcache.open_store()
    assert len(cache) == 3
    files = _value_files()
    assert diskcache.sweep_orphans(min_age_s=3600) == 0  # the killed writer's file is too young to be sure
    assert _value_files() == files
    assert diskcache.sweep_orphans(min_age_s=0) == len(files) - 1 == 1  # the killed writer's file
    assert len(_value_files()) == 1  # only "fresh" is big enough for a file
    np.testing.assert_array_equal(diskcache.load("ns", ("fresh",)), new)
    with warnings.catch_warnings():  # diskcache's own check finds nothing left to fix
        warnings.simplefilter("error")
        cache.check(fix=False)


def test_orphan_sweep_keeps_referenced_and_young_files(fixed_code):
    import os
    import shutil
    import time

    value = np.arange(2.0**16)
    assert diskcache.store("ns", ("a",), value)
    (kept,) = _value_files()
    old_orphan = kept.with_name("0" * 28 + ".val")
    young_orphan = kept.with_name("1" * 28 + ".val")
    for orphan in (old_orphan, young_orphan):
        shutil.copy(kept, orphan)
    hour_ago = time.time() - 2 * diskcache.ORPHAN_AGE_S
    os.utime(old_orphan, (hour_ago, hour_ago))
    os.utime(kept, (hour_ago, hour_ago))  # an old entry still in use is kept however old
    assert diskcache.sweep_orphans() == 1
    assert sorted(_value_files()) == sorted([kept, young_orphan])
    np.testing.assert_array_equal(diskcache.load("ns", ("a",)), value)


def test_orphans_are_swept_in_the_background_when_a_process_opens_the_store(fixed_code, monkeypatch):
    import time

    assert diskcache.store("ns", ("a",), np.arange(2.0**16))
    (kept,) = _value_files()
    orphan = kept.with_name("2" * 28 + ".val")
    orphan.write_bytes(b"left by a killed writer")
    monkeypatch.setattr(diskcache, "ORPHAN_AGE_S", 0.0)
    monkeypatch.setattr(diskcache, "_SWEPT", {})
    monkeypatch.setattr(diskcache, "sweep_orphans",
                        lambda cache, f=diskcache.sweep_orphans: f(cache, min_age_s=0.0))
    diskcache._OPEN.clear()  # a new process
    diskcache.open_store()
    for _ in range(200):
        if not orphan.exists():
            break
        time.sleep(0.02)
    assert not orphan.exists() and kept.exists()


_SAME_KEY_WRITER = """
import hashlib, json, os
value = np.arange(2**17, dtype=float)  # 1 MiB
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.002)
stored = sum(dc.store("ns", ("same",), value) for _ in range(15))
got = dc.cached("ns", ("same",), lambda: value)
print(json.dumps({"stored": stored, "digest": hashlib.sha256(got.tobytes()).hexdigest()}), flush=True)
"""


def test_two_processes_writing_one_key(fixed_code):
    import hashlib

    value = np.arange(2**17, dtype=float)
    go = fixed_code / "go"
    procs = [_child(_SAME_KEY_WRITER, str(go)) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        go.touch()
        results = [json.loads(p.stdout.readline()) for p in procs]
        assert [p.wait(30) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    assert [r["stored"] for r in results] == [15, 15]
    assert {r["digest"] for r in results} == {hashlib.sha256(value.tobytes()).hexdigest()}
    assert len(diskcache.open_store()) == 1
    assert len(_value_files()) == 1  # every overwritten file was deleted
    np.testing.assert_array_equal(diskcache.cached("ns", ("same",), lambda: None), value)


def test_concurrent_threads_share_one_store(fixed_code):
    from concurrent.futures import ThreadPoolExecutor

    def work(i):
        value = np.full(5000, float(i % 4))
        got = diskcache.cached("ns", (i % 4,), lambda: value)
        return bool(np.array_equal(got, value))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(64)))
    assert len(diskcache.open_store()) == 4
