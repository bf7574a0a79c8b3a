"""Shared test setup: one torch thread per pytest worker (2 workers on 2 cores), and the shared data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real datasets laid out as in ../shared/data; the test is skipped when they are absent."""
    root = Path(os.environ.get("MOE_APPS_DATA", SHARED_DATA))
    if not root.is_dir():
        pytest.skip(f"real data folder {root} is absent (set MOE_APPS_DATA to run this test)")
    return root
