"""Thread count: every usable core by default, ``ADAPTER_ATLAS_THREADS`` overrides it."""

from __future__ import annotations

import os

import pytest
import torch

from geometry import device


def test_default_threads_follow_the_machine_and_the_override(monkeypatch):
    monkeypatch.delenv(device.THREADS_ENV, raising=False)
    assert device.default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(device.THREADS_ENV, "1")
    assert device.default_threads() == 1
    before = torch.get_num_threads()
    try:
        assert device.configure_threads() == 1 and torch.get_num_threads() == 1
        assert device.configure_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for bad in ("zero", "0", "-3"):
        monkeypatch.setenv(device.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=device.THREADS_ENV):
            device.default_threads()
