"""A learned merge interrupted (its process killed, or stopped) resumes from its last finished step when started
again with the same inputs and cache, and ends exactly where an uninterrupted run ends: the checkpoint holds the
coefficients, Adam's moments, the history and the evaluations, and the mini-batches are a function of the step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from geometry.cache import ResultCache
from geometry.learned import AdaMerging, DivMerge

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.mark.parametrize("method, level", [(DivMerge, "task"), (DivMerge, "layer"), (AdaMerging, "task")])
def test_a_broken_off_run_resumes_and_ends_where_an_uninterrupted_one_does(learned_tiny, tmp_path, method, level):
    adapters, tasks = learned_tiny
    kw = dict(samples=8, epochs=3, lr=0.1, level=level)
    whole = method(adapters[:2], tasks, **kw)
    whole_result = whole.fit(evaluate_every=2, limit=8)
    cache = ResultCache(tmp_path / "runs")
    first = method(adapters[:2], tasks, cache=cache, **kw)
    assert first.total_steps >= 5
    for state in first.steps(evaluate_every=2, limit=8):
        assert state.resumed_from is None
        if state.step == 3:
            break  # the process "dies" here: only the checkpoint of step 3 survives
    second = method(adapters[:2], tasks, cache=cache, **kw)
    states = list(second.steps(evaluate_every=2, limit=8))
    assert states[0].step == 4 and all(s.resumed_from == 3 for s in states) and second.resumed_from == 3
    assert not states[0].cached and states[-1].done
    np.testing.assert_array_equal(second.coefficients, whole_result.coefficients)
    assert [h["objective"] for h in second.history] == [h["objective"] for h in whole.history]
    assert [e["step"] for e in second.evaluations] == [e["step"] for e in whole.evaluations]
    # finished: the result replaces the checkpoint; a third run reads the finished result
    assert cache.get("learned_checkpoint", second.cache_key()) is None
    third = method(adapters[:2], tasks, cache=cache, **kw)
    assert list(third.steps())[0].cached


def test_no_checkpoint_without_a_cache_and_another_setting_starts_over(learned_tiny, tmp_path):
    adapters, tasks = learned_tiny
    cache = ResultCache(tmp_path / "runs")
    run = DivMerge(adapters[:2], tasks, samples=8, epochs=2, lr=0.1, cache=cache)
    next(iter(run.steps()))
    assert cache.get("learned_checkpoint", run.cache_key())["step"] == 1
    other = DivMerge(adapters[:2], tasks, samples=8, epochs=2, lr=0.2, cache=cache)  # another key
    assert next(iter(other.steps())).resumed_from is None
    bare = DivMerge(adapters[:2], tasks, samples=8, epochs=2, lr=0.1)
    assert bare.cache is None and next(iter(bare.steps())).resumed_from is None


SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from geometry.io.loader import load_adapter
    from geometry.learned import DivMerge
    from tests.learned_fixtures import amplified
    torch.set_num_threads(1)
    folders, tasks, cache = json.loads(sys.argv[1])
    adapters = [amplified(load_adapter(f)) for f in folders]
    run = DivMerge(adapters, tasks, samples=8, epochs=4, lr=0.1, cache=cache)
    for state in run.steps():
        print(json.dumps({"step": state.step, "resumed_from": state.resumed_from,
                          "coefficients": state.coefficients.tolist()}), flush=True)
""")


@pytest.mark.slow
def test_a_run_killed_with_its_process_resumes_in_a_new_one(learned_study_dirs, tmp_path):
    """SIGKILL (no clean-up runs) after a few steps; the next process starts after the last finished step."""
    folders, tasks = learned_study_dirs
    args = json.dumps([[str(f) for f in folders[:2]], str(tasks), str(tmp_path / "runs")])
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, args], stdout=subprocess.PIPE, text=True, env=env)
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(json.loads(line))
        if seen[-1]["step"] >= 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(60)
    assert seen and seen[-1]["step"] >= 3, "the first process did not reach step 3"
    killed_at = seen[-1]["step"]
    again = subprocess.run([sys.executable, "-c", SCRIPT, args], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = [json.loads(line) for line in again.stdout.splitlines()]
    # the kill may land while step killed_at + 1's checkpoint is being written: resumed at killed_at or one later
    assert resumed[0]["resumed_from"] in (killed_at, killed_at + 1)
    assert resumed[0]["step"] == resumed[0]["resumed_from"] + 1
    whole = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([[str(f) for f in folders[:2]], str(tasks),
                                                                       str(tmp_path / "other")])],
                           capture_output=True, text=True, env=env, timeout=300)
    final = json.loads(whole.stdout.splitlines()[-1])
    assert final["resumed_from"] is None
    np.testing.assert_array_equal(np.array(resumed[-1]["coefficients"]), np.array(final["coefficients"]))
