"""The runtime's process-wide caches are bounded and clearable (geometry/runtime/bases.py)."""

from geometry.runtime import bases


def test_loaded_bases_are_bounded_least_recently_used_first():
    bases.clear_cache()
    made = []

    def factory(k):
        def make():
            made.append(k)
            return object()
        return make

    try:
        first = bases.cached_runtime(("base-0",), factory(0))
        assert bases.cached_runtime(("base-0",), factory("again")) is first  # loaded once
        for k in range(1, bases.MAX_RUNTIMES + 3):
            bases.cached_runtime((f"base-{k}",), factory(k))
            bases.cached_runtime(("base-0",), factory("kept warm"))  # the one in use is never the one dropped
            assert bases.cached_runtimes() <= bases.MAX_RUNTIMES
        assert "again" not in made and "kept warm" not in made
        assert bases.cached_runtime(("base-0",), factory("x")) is first
        bases.cached_runtime(("base-1",), factory("reloaded"))
        assert made[-1] == "reloaded"  # base-1 was dropped (least recently used) and loads again
    finally:
        bases.clear_cache()
    assert bases.cached_runtimes() == 0
