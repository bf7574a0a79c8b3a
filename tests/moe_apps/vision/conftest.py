"""Fixtures of the vision tests: a synthetic CIFAR-10 data root (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vision_synthetic import write_synthetic_cifar


@pytest.fixture(scope="session")
def cifar_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_cifar(tmp_path_factory.mktemp("vision-data"))
