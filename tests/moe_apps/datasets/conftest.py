"""Fixtures for the data-layer tests: tiny datasets in each official format under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets_fixtures import write_cifar_tar, write_ml1m, write_ml100k, write_multi30k


@pytest.fixture
def ml100k_root(tmp_path: Path) -> Path:
    write_ml100k(tmp_path)
    return tmp_path


@pytest.fixture
def ml1m_root(tmp_path: Path) -> Path:
    write_ml1m(tmp_path)
    return tmp_path


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_cifar_tar(tmp_path)
    return tmp_path


@pytest.fixture
def multi30k_root(tmp_path: Path) -> Path:
    write_multi30k(tmp_path)
    return tmp_path
