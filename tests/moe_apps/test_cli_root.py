"""The `moe-apps` root: --version, info, and an instant --help (no heavy imports)."""

from __future__ import annotations

import subprocess
import sys

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


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from moe_apps.cli import app; "
        "heavy = [m for m in ('torch', 'torchrec', 'torchvision', 'matplotlib', 'sklearn') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_command_fails() -> None:
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code != 0
