"""Where computations run: CUDA when present, CPU otherwise; how many CPU threads torch uses."""

from __future__ import annotations

import os

import torch

from geometry.errors import InvalidArgumentError


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible (and ``ADAPTER_ATLAS_DEVICE`` does not say otherwise), else ``cpu``."""
    forced = os.environ.get("ADAPTER_ATLAS_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: Environment variable overriding the CPU thread count (``ADAPTER_ATLAS_THREADS=1``).
THREADS_ENV = "ADAPTER_ATLAS_THREADS"


def default_threads() -> int:
    """``$ADAPTER_ATLAS_THREADS`` when set, else the number of cores this process may run on.

    Measured on the 2-core development machines (``bench/geometry_bench.py``, distances of 8
    Llama-3-8B-shaped adapters): 2 threads are faster than 1, so every core is used by default.
    A server hosting many sessions may prefer ``ADAPTER_ATLAS_THREADS=1``.
    """
    forced = os.environ.get(THREADS_ENV, "").strip()
    if forced:
        try:
            value = int(forced)
        except ValueError:
            raise InvalidArgumentError(f"{THREADS_ENV}={forced!r}: expected a whole number of threads") from None
        if value < 1:
            raise InvalidArgumentError(f"{THREADS_ENV}={forced!r}: expected at least 1 thread")
        return value
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count to ``threads`` (default :func:`default_threads`); returns it."""
    n = int(threads) if threads is not None else default_threads()
    torch.set_num_threads(n)
    return n
