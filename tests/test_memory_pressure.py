"""A demo server under memory pressure, tested as an attacker would: visitors (the websocket protocol client, what a
browser sends) upload as much as they are allowed, all at once, against a small server-wide budget
(``bench/memory_pressure.py``). The server must refuse what does not fit with a message, keep every visitor's
set as it was told, stay within its budget plus the uploads in flight, release idle visitors' uploads only after
the stated time, and tell them. About a minute."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow]


def test_uploads_over_the_budget_are_refused_and_the_server_holds_what_it_says(tmp_path):
    from bench.memory_pressure import run

    result = run(sessions=6, uploads=4, mb=12.0, budget="120M", idle=20.0, work=tmp_path)
    mib = 2**20
    print({k: (v / mib if "bytes" in k and isinstance(v, int) else v) for k, v in result.items()})
    assert result["errors"] == [] and result["mismatches"] == []
    offered = result["sessions"] * result["uploads per session"]
    assert result["uploads loaded"] + result["refusals"] == offered
    # the budget binds: 24 uploads of 12 MB offered, 120 MB allowed (the samples take a little of it)
    assert 5 <= result["uploads loaded"] <= 10 and result["refusals"] >= 14
    message = result["refusal message"]
    assert "memory budget" in message and "Remove adapters" in message and "own machine" in message
    assert result["rss growth (bytes)"] <= result["allowed growth (bytes)"], result["rss by stage (bytes)"]
    # the idle time passed: every visitor holding uploads was told they were released, the newcomer got in
    assert result["newcomer loaded"] and result["sessions with uploads not released"] == []
    assert result["sessions told of the release"] == result["sessions"] - result["sessions without uploads"]
    assert result["ok"]
