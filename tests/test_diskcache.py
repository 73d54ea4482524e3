"""The library's disk cache (geometry/cache.py): hit, miss, key sensitivity, size cap (LRU eviction), damaged
entries recomputed, writers killed mid-way, concurrent writers of one key, orphan files swept, and the
policy: nothing on disk unless a cache is given, the code version hashing ``geometry/`` only."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import warnings

import numpy as np
import pytest

from geometry import cache as gc
from geometry.cache import ResultCache

#: Child processes load geometry/cache.py by path (not the ``geometry`` package, which imports torch)
#: and use a fixed code version, as the tests here do through ``fixed_code``.
_CHILD = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("atlas_cache", {str(gc.__file__)!r})
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)
dc.code_version = lambda *a, **k: "test-code"
store = dc.ResultCache(sys.argv[1])
import numpy as np
"""


@pytest.fixture
def fixed_code(monkeypatch):
    monkeypatch.setattr(gc, "code_version", lambda *a, **k: "test-code")


@pytest.fixture
def cache(tmp_path, fixed_code, monkeypatch):
    """A cache without its background orphan sweep (the tests here sweep when they mean to)."""
    monkeypatch.setattr(ResultCache, "_sweep_in_background", lambda self: None)
    c = ResultCache(tmp_path / "store")
    yield c
    c.close()


def _child(code: str, folder, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD + code, str(folder), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _value_files(cache: ResultCache):
    return sorted(cache.directory.rglob("*.val"))


def test_as_cache_and_cached(tmp_path, fixed_code):
    assert gc.as_cache(None) is None
    c = ResultCache(tmp_path / "a")
    assert gc.as_cache(c) is c
    by_path = gc.as_cache(tmp_path / "b")
    assert isinstance(by_path, ResultCache) and by_path.directory == (tmp_path / "b").resolve()
    assert gc.as_cache(str(tmp_path / "b")) is by_path  # one object per folder: one store, one sweep
    with pytest.raises(ValueError, match="cache must be"):
        gc.as_cache(42)
    calls = []
    assert gc.cached(None, "ns", ("k",), lambda: calls.append(1) or 1) == 1
    assert gc.cached(None, "ns", ("k",), lambda: calls.append(1) or 1) == 1 and len(calls) == 2  # no cache
    assert not (tmp_path / "c").exists()
    assert gc.cached(tmp_path / "c", "ns", ("k",), lambda: calls.append(1) or 1) == 1
    assert gc.cached(tmp_path / "c", "ns", ("k",), lambda: calls.append(1) or 1) == 1 and len(calls) == 3
    assert (tmp_path / "c" / "cache.db").is_file()


def test_constructing_a_cache_touches_no_disk(tmp_path):
    c = ResultCache(tmp_path / "later", size_mb=0.5, salt="s")
    assert not (tmp_path / "later").exists()
    assert c.size_limit == 2**19 and c.salt == "s" and "later" in repr(c)
    assert ResultCache(tmp_path, size_mb="lots").size_limit == 2048 * 2**20


def test_get_or_compute_computes_once_and_keys_by_content(cache, tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"values": np.arange(3.0)}

    first = cache.get_or_compute("ns", ("v1", "hash-a"), compute)
    second = cache.get_or_compute("ns", ("v1", "hash-a"), compute)
    np.testing.assert_array_equal(first["values"], second["values"])
    assert len(calls) == 1
    cache.get_or_compute("ns", ("v1", "hash-b"), compute)
    cache.get_or_compute("other", ("v1", "hash-a"), compute)
    assert len(calls) == 3 and len(cache) == 3
    assert gc.cache_key(("ab", "c")) != gc.cache_key(("a", "bc"))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    assert cache.get("ns", ("v1", "missing"), "default") == "default"
    assert cache.clear() == 3 and len(cache) == 0


def test_the_salt_separates_entries(tmp_path, fixed_code):
    plain, salted = ResultCache(tmp_path), ResultCache(tmp_path, salt="ui-1")
    assert plain.set("ns", ("k",), "plain") and salted.set("ns", ("k",), "salted")
    assert plain.get("ns", ("k",)) == "plain" and salted.get("ns", ("k",)) == "salted"
    assert ResultCache(tmp_path, salt="ui-2").get("ns", ("k",)) is None
    assert len(plain) == 2  # one store, two entries


def test_a_cache_pickles_as_its_settings(tmp_path, fixed_code):
    import pickle

    c = ResultCache(tmp_path, size_mb=1, salt="x")
    assert c.set("ns", ("k",), [1, 2])
    copy = pickle.loads(pickle.dumps(c))
    assert (copy.directory, copy.size_limit, copy.salt) == (c.directory, c.size_limit, "x")
    assert copy.get("ns", ("k",)) == [1, 2]


def test_failing_or_unpicklable_compute_stores_nothing(cache):
    with pytest.raises(KeyError):
        cache.get_or_compute("ns", ("k",), lambda: {}["missing"])
    assert cache.get("ns", ("k",)) is None
    unpicklable = lambda: 1  # noqa: E731
    assert cache.get_or_compute("ns", ("f",), lambda: unpicklable) is unpicklable
    assert cache.set("ns", ("f",), unpicklable) is False
    assert len(cache) == 0


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete", "row"])
def test_damaged_entry_is_recomputed_and_rewritten(cache, damage):
    big = damage != "row"  # values of 32 KiB or more live in a file, smaller ones in the SQLite row
    good = np.arange(8192.0 if big else 16.0)
    assert cache.set("ns", ("k",), good)
    if big:
        (path,) = _value_files(cache)
        data = path.read_bytes()
        if damage == "truncate":  # a half-written file
            path.write_bytes(data[: len(data) // 2])
        elif damage == "overwrite":  # same length, bytes zeroed inside the array: only the digest tells
            mid = len(data) // 2
            path.write_bytes(data[:mid] + bytes(100) + data[mid + 100:])
        else:
            path.unlink()
    else:
        with sqlite3.connect(cache.directory / "cache.db") as con:
            (blob,) = con.execute("SELECT value FROM Cache").fetchone()
            con.execute("UPDATE Cache SET value = ?", (bytes(blob[:-8]) + b"garbage!",))
        con.close()
    recomputed = cache.get_or_compute("ns", ("k",), lambda: good + 1)
    np.testing.assert_array_equal(recomputed, good + 1)
    np.testing.assert_array_equal(cache.get_or_compute("ns", ("k",), lambda: good), good + 1)
    assert len(cache) == 1


def test_unwritable_directory_still_returns_the_value(tmp_path, fixed_code):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    c = ResultCache(blocker)
    assert c.get_or_compute("ns", ("k",), lambda: "value") == "value"
    assert c.get("ns", ("k",), "default") == "default"
    assert c.set("ns", ("k",), "value") is False and len(c) == 0 and c.sweep_orphans() == 0


def test_key_holds_the_code_version(tmp_path, monkeypatch):
    """After the code changes, a cached result is recomputed (the key holds a hash of the source)."""
    c = ResultCache(tmp_path)
    calls = []
    c.get_or_compute("ns", ("k",), lambda: calls.append(1) or 1)
    c.get_or_compute("ns", ("k",), lambda: calls.append(1) or 1)
    assert len(calls) == 1
    monkeypatch.setattr(gc, "code_version", lambda *a, **k: "some-other-code")
    assert c.get_or_compute("ns", ("k",), lambda: calls.append(1) or 2) == 2
    assert len(calls) == 2


def test_code_version_hashes_the_library_only(tmp_path):
    """The library's key follows its own source and never the dashboard's (``ui/``)."""
    pkg, ui = tmp_path / "geometry", tmp_path / "ui"
    pkg.mkdir()
    ui.mkdir()
    (pkg / "m.py").write_text("x = 1\n")
    (ui / "page.py").write_text("y = 1\n")
    first = gc.code_version(tmp_path)
    assert gc.code_version(tmp_path) == first
    gc.code_version.cache_clear()
    (ui / "page.py").write_text("y = 2\n")
    assert gc.code_version(tmp_path) == first  # the dashboard's code is not part of it
    gc.code_version.cache_clear()
    (pkg / "m.py").write_text("x = 2\n")
    assert gc.code_version(tmp_path) != first
    assert gc.CODE_DIRS == ("geometry",)
    source = (gc.REPO / "geometry" / "cache.py").read_text()
    assert "import ui" not in source and "from ui" not in source


def test_size_cap_evicts_least_recently_used(tmp_path, fixed_code):
    c = ResultCache(tmp_path, size_mb=0.5)
    sizes = []
    for i in range(30):  # 30 entries of ~40 KB (files) against a 512 KiB cap
        assert c.set("ns", (i,), np.full(5000, float(i)))
        assert c.get("ns", (0,)) is not None  # entry 0 stays the most recently used
        sizes.append(len(c))
    store = c.store()
    full = max(sizes)
    assert all(n >= full - 10 for n in sizes[full:])  # diskcache's cull evicts up to ten at a time
    assert store.volume() <= store.size_limit == 2**19
    assert 2 < len(c) < 30
    assert len(_value_files(c)) == len(c)  # evicted entries' files are gone too
    assert all(c.get("ns", (i,)) is None for i in range(1, 10))
    for i in (0, 28, 29):
        np.testing.assert_array_equal(c.get("ns", (i,)), np.full(5000, float(i)))


_KILLED_WRITER = """
import os
import diskcache.core as core

def pause(message):
    print(message, flush=True)
    time.sleep(60)

if sys.argv[2] == "file":  # half the value file written, then killed
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
store.set("ns", ("big",), np.arange(2**20, dtype=float))
"""


@pytest.mark.parametrize("where", ["file", "commit"])
def test_writer_killed_mid_way_leaves_the_cache_usable(cache, where):
    old = np.arange(10.0)
    assert cache.set("ns", ("big",), old)
    assert cache.set("ns", ("other",), "kept")
    proc = _child(_KILLED_WRITER, cache.directory, where)
    try:
        assert proc.stdout.readline().strip() in ("writing", "committing")
        proc.kill()  # SIGKILL
        proc.wait(10)
    finally:
        proc.kill()
    np.testing.assert_array_equal(cache.get("ns", ("big",)), old)  # the earlier entry is intact
    assert cache.get("ns", ("other",)) == "kept"
    new = np.arange(2.0**16)
    assert cache.get_or_compute("ns", ("fresh",), lambda: new) is new
    np.testing.assert_array_equal(cache.get("ns", ("fresh",)), new)
    assert len(cache) == 3
    files = _value_files(cache)
    assert cache.sweep_orphans(min_age_s=3600) == 0  # the killed writer's file is too young to be sure
    assert _value_files(cache) == files
    assert cache.sweep_orphans(min_age_s=0) == len(files) - 1 == 1  # the killed writer's file
    assert len(_value_files(cache)) == 1  # only "fresh" is big enough for a file
    np.testing.assert_array_equal(cache.get("ns", ("fresh",)), new)
    with warnings.catch_warnings():  # diskcache's own check finds nothing left to fix
        warnings.simplefilter("error")
        cache.store().check(fix=False)


def test_orphan_sweep_keeps_referenced_and_young_files(cache):
    import os
    import shutil
    import time

    value = np.arange(2.0**16)
    assert cache.set("ns", ("a",), value)
    (kept,) = _value_files(cache)
    old_orphan = kept.with_name("0" * 28 + ".val")
    young_orphan = kept.with_name("1" * 28 + ".val")
    for orphan in (old_orphan, young_orphan):
        shutil.copy(kept, orphan)
    other = cache.directory / "notes.txt"  # not a value file of diskcache's layout: never touched
    other.write_text("mine")
    hour_ago = time.time() - 2 * gc.ORPHAN_AGE_S
    for path in (old_orphan, kept, other):  # an old entry still in use is kept however old
        os.utime(path, (hour_ago, hour_ago))
    assert cache.sweep_orphans() == 1
    assert sorted(_value_files(cache)) == sorted([kept, young_orphan]) and other.exists()
    np.testing.assert_array_equal(cache.get("ns", ("a",)), value)


def test_orphans_are_swept_in_the_background_when_a_cache_opens_its_store(tmp_path, fixed_code, monkeypatch):
    import threading
    import time

    first = ResultCache(tmp_path)
    assert first.set("ns", ("a",), np.arange(2.0**16))
    for thread in threading.enumerate():  # its own sweep (an hour's margin: nothing to do) has finished
        if thread.name == "result-cache-orphan-sweep":
            thread.join(10)
    (kept,) = _value_files(first)
    orphan = kept.with_name("2" * 28 + ".val")
    orphan.write_bytes(b"left by a killed writer")
    monkeypatch.setattr(gc, "ORPHAN_AGE_S", 0.0)
    again = ResultCache(tmp_path)  # as a new process would
    assert orphan.exists()  # nothing happens before the store is used
    again.store()
    for _ in range(200):
        if not orphan.exists():
            break
        time.sleep(0.02)
    assert not orphan.exists() and kept.exists()


_SAME_KEY_WRITER = """
import hashlib, json, os
value = np.arange(2**17, dtype=float)  # 1 MiB
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
stored = sum(store.set("ns", ("same",), value) for _ in range(15))
got = store.get_or_compute("ns", ("same",), lambda: value)
print(json.dumps({"stored": stored, "digest": hashlib.sha256(got.tobytes()).hexdigest()}), flush=True)
"""


def test_two_processes_writing_one_key(cache, tmp_path):
    import hashlib

    value = np.arange(2**17, dtype=float)
    go = tmp_path / "go"
    procs = [_child(_SAME_KEY_WRITER, cache.directory, str(go)) for _ in range(2)]
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
    assert len(cache) == 1
    assert len(_value_files(cache)) == 1  # every overwritten file was deleted
    np.testing.assert_array_equal(cache.get_or_compute("ns", ("same",), lambda: None), value)


def test_concurrent_threads_share_one_store(cache):
    from concurrent.futures import ThreadPoolExecutor

    def work(i):
        value = np.full(5000, float(i % 4))
        got = cache.get_or_compute("ns", (i % 4,), lambda: value)
        return bool(np.array_equal(got, value))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(64)))
    assert len(cache) == 4


def test_learned_references_in_memory_are_bounded_and_clearable(monkeypatch):
    """The learned merges' reference distributions live in a byte-bounded LRU, not an unbounded dict."""
    import torch
    from cachetools import LRUCache

    from geometry.learned import terms

    assert isinstance(terms._MEMORY, LRUCache) and terms._MEMORY.maxsize == terms.MEMORY_BYTES
    monkeypatch.setattr(terms, "_MEMORY", LRUCache(maxsize=1000, getsizeof=terms._nbytes))
    for i in range(6):
        terms._memo(("k", i), lambda: torch.zeros(50), None)  # 200 bytes each: five fit
    assert terms._MEMORY.currsize == 1000 and ("k", 0) not in terms._MEMORY and ("k", 5) in terms._MEMORY
    calls = []
    assert terms._memo(("k", 4), lambda: calls.append(1), None).shape == (50,) and calls == []  # from memory
    assert terms._memo(("big",), lambda: torch.zeros(1000), None).shape == (1000,)  # over the budget: not kept
    assert ("big",) not in terms._MEMORY
    terms.clear_memory_cache()
    assert len(terms._MEMORY) == 0
