"""Fixtures of the translation tests: a synthetic Multi30k data root and one smoke run trained on
it through the CLI (both built once per session; tests that write copy the run first)."""

from __future__ import annotations

from pathlib import Path

import pytest
from translation_synthetic import write_synthetic_multi30k
from typer.testing import CliRunner

from moe_apps.cli import app


@pytest.fixture(scope="session")
def multi30k_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_multi30k(tmp_path_factory.mktemp("translation-data"))


@pytest.fixture(scope="session")
def smoke_run(multi30k_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("translation-runs") / "smoke"
    result = CliRunner().invoke(app, ["translation", "train", "--preset", "smoke", "--out", str(out),
                                      "--data-dir", str(multi30k_root), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out
