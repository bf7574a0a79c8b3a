"""Fixtures the recsys test files share: a synthetic ML-100K folder and a `tiny` run trained on it
(module-scoped: each test file gets its own copy, so no file sees another's changes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from recsys_synthetic import write_random_ml100k
from typer.testing import CliRunner

from moe_apps.cli import app


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recsys-data")
    write_random_ml100k(root)
    return root


@pytest.fixture(scope="module")
def trained(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mmoe-run"
    result = CliRunner().invoke(app, ["recsys", "train", "--preset", "tiny", "--data-dir", str(data_root),
                                      "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "like_auc" in result.output and "rating_rmse" in result.output
    return out
