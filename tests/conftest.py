"""Shared test setup: one torch thread (2-core machines), paths to ../shared when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_ADAPTERS = SHARED / "real_adapters"


@pytest.fixture(scope="session")
def real_adapters_dir() -> Path:
    """``../shared/real_adapters``; skips the test when it is absent."""
    if not REAL_ADAPTERS.is_dir():
        pytest.skip("../shared/real_adapters is absent")
    return REAL_ADAPTERS
