"""The `moe-apps` root: --version, info, and an instant --help (no heavy imports)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moe_apps import __version__
from moe_apps.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"moe-apps {__version__}"


def test_info_reports_versions_device_and_data(tmp_path) -> None:
    (tmp_path / "movielens" / "ml-100k").mkdir(parents=True)
    result = runner.invoke(app, ["info", "--data-dir", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for needle in ("torch", "torchrec", "device", "cpu", "threads", str(tmp_path), "movielens-100k", "cifar10"):
        assert needle in result.output, f"{needle!r} missing from:\n{result.output}"


@pytest.mark.parametrize("args", [["--help"], ["data", "download", "--help"], ["recsys", "train", "--help"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    code = (
        "import sys\n"
        "from moe_apps.cli import app\n"
        f"try: app({args!r})\n"
        "except SystemExit as exit: assert exit.code == 0, exit.code\n"
        "heavy = [m for m in ('torch', 'torchrec', 'torchvision', 'matplotlib', 'sklearn', 'numpy',"
        " 'urllib.request') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout

