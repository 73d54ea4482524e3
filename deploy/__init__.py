"""Deployment helpers: a Dockerfile parser and the replay of its install and start steps, nginx in front of
the server (see ``docs/deploy.md``)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, interval: float = 0.3) -> bool:
    """Poll ``url + "/_stcore/health"`` until it answers 200 (``True``), or until ``proc`` has exited or
    ``timeout`` seconds have passed (``False``)."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(interval)


@contextmanager
def served(url: str, proc: subprocess.Popen, timeout: float, what: str, interval: float = 0.3,
           detail: Callable[[], str] = str) -> Iterator[str]:
    """``url`` once ``proc`` answers its health check (:func:`wait_healthy`; ``RuntimeError`` naming ``what``,
    and ``detail()``, when it does not); ``proc`` is terminated (killed after 10 s) when the block ends."""
    try:
        if not wait_healthy(url, proc, timeout, interval):
            raise RuntimeError(f"{what} did not start{detail()}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
