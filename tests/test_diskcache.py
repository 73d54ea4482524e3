"""On-disk cache: hit, miss, key sensitivity, atomic files, corrupt entries recomputed."""

from __future__ import annotations

import numpy as np

from geometry import diskcache


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path / "c"))
    assert diskcache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ADAPTER_ATLAS_CACHE")
    assert diskcache.cache_dir() == diskcache.REPO / "cache"


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


def test_corrupt_entry_is_recomputed_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path))
    path = diskcache.cache_path("ns", ("k",))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x05 truncated")
    assert diskcache.cached("ns", ("k",), lambda: 42) == 42
    assert diskcache.cached("ns", ("k",), lambda: 0) == 42


def test_unwritable_directory_still_returns_the_value(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(blocker))
    assert diskcache.cached("ns", ("k",), lambda: "value") == "value"


def test_key_holds_the_code_version(tmp_path, monkeypatch):
    """After the code changes, a cached result is recomputed (the key holds a hash of the source)."""
    monkeypatch.setenv("ADAPTER_ATLAS_CACHE", str(tmp_path))
    calls = []
    diskcache.cached("ns", ("k",), lambda: calls.append(1) or 1)
    diskcache.cached("ns", ("k",), lambda: calls.append(1) or 1)
    assert len(calls) == 1
    monkeypatch.setattr(diskcache, "code_version", lambda *a, **k: "some-other-code")
    diskcache.cached("ns", ("k",), lambda: calls.append(1) or 2)
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
