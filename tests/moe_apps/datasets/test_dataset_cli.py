"""`moe-apps data list | info | download | verify` through the root CLI (typer CliRunner)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_apps.cli import app

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_list(ml100k_root: Path) -> None:
    code, out = _run("data", "list", "--data-dir", str(ml100k_root))
    assert code == 0
    for name in ("movielens-100k", "movielens-1m", "cifar10", "multi30k"):
        assert name in out
    assert "complete" in out and "absent" in out


def test_info(ml100k_root: Path) -> None:
    code, out = _run("data", "info", "multi30k", "--data-dir", str(ml100k_root))
    assert code == 0
    assert "raw.githubusercontent.com/multi30k/dataset" in out
    assert "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f" in out
    assert "Elliott" in out and "non-commercial" in out


def test_info_unknown_dataset() -> None:
    code, out = _run("data", "info", "mnist")
    assert code == 2 and "unknown dataset 'mnist'" in out


def test_verify_fixture_is_not_valid(multi30k_root: Path) -> None:
    code, out = _run("data", "verify", "multi30k", "--data-dir", str(multi30k_root))
    assert code == 1
    assert "NOT valid" in out and "FAIL" in out and "expected 29,000" in out


def test_verify_missing_dataset(tmp_path: Path) -> None:
    code, out = _run("data", "verify", "cifar10", "--data-dir", str(tmp_path))
    assert code == 1 and "missing" in out


def test_download_offline_is_one_clear_message(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)  # never touch the network in tests
    code, out = _run("data", "download", "movielens-1m", "--data-dir", str(tmp_path))
    assert code == 1
    flat = " ".join(out.split())
    assert "could not download 'movielens-1m'" in flat and "ml-1m.zip" in flat
    assert "Traceback" not in out


def test_root_info_lists_datasets(ml100k_root: Path) -> None:
    code, out = _run("info", "--data-dir", str(ml100k_root))
    assert code == 0 and "movielens-100k" in out and "complete" in out
    assert f"{ml100k_root} (--data-dir)" in out


def test_data_root_from_environment_and_flag(ml100k_root: Path, tmp_path_factory) -> None:
    empty = tmp_path_factory.mktemp("empty")
    env = {"COLUMNS": "200", "MOE_APPS_DATA": str(ml100k_root)}
    listed = runner.invoke(app, ["data", "list"], env=env)  # no flag: $MOE_APPS_DATA
    assert listed.exit_code == 0 and str(ml100k_root) in listed.output
    assert "complete" in listed.output
    info = runner.invoke(app, ["info"], env=env)
    assert info.exit_code == 0 and f"{ml100k_root} ($MOE_APPS_DATA)" in info.output
    flagged = runner.invoke(app, ["data", "list", "--data-dir", str(empty)], env=env)  # flag wins
    assert flagged.exit_code == 0 and str(empty) in flagged.output
    assert "complete" not in flagged.output


@pytest.mark.shared_data
def test_verify_shared_multi30k(shared_data: Path) -> None:
    code, out = _run("data", "verify", "multi30k", "--data-dir", str(shared_data))
    assert code == 0 and "valid" in out and "NOT valid" not in out


@pytest.mark.shared_data
def test_list_shared(shared_data: Path) -> None:
    code, out = _run("data", "list", "--data-dir", str(shared_data))
    assert code == 0 and out.count("complete") >= 3


def test_download_into_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    from moe_apps.training.cli import EXIT_FAILURE

    (tmp_path / "file").write_text("x")
    code, out = _run("data", "download", "movielens-100k", "--data-dir", str(tmp_path / "file" / "data"))
    assert code == EXIT_FAILURE
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Not a directory" in lines[0] and str(tmp_path / "file") in lines[0], out
