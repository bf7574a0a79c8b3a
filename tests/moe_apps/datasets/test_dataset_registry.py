"""Registry, data root resolution, status and verification (on fixtures and on the shared data)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from moe_apps.datasets import DATASETS, dataset_status, get_spec, resolve_data_root, verify_dataset


def test_registry_entries_are_complete() -> None:
    assert list(DATASETS) == ["movielens-100k", "movielens-1m", "cifar10", "multi30k"]
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert spec.license and spec.citation and spec.checksum_note and spec.homepage
        assert spec.downloads and all(d.url.startswith("https://") for d in spec.downloads)
        for digest in spec.sha256.values():
            assert re.fullmatch(r"[0-9a-f]{64}", digest)
        for d in spec.downloads:
            assert d.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", d.sha256)
            assert d.md5 is None or re.fullmatch(r"[0-9a-f]{32}", d.md5)
    cifar = DATASETS["cifar10"].downloads[0]
    assert cifar.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cifar.md5 == "c58f30108f718f92721af3b95e74349a"
    assert DATASETS["movielens-100k"].downloads[0].url.endswith("/movielens/ml-100k.zip")
    assert DATASETS["movielens-1m"].downloads[0].url.endswith("/movielens/ml-1m.zip")
    # every required multi30k file has a sha256 on its download and in the in-place table
    m30k = DATASETS["multi30k"]
    required = [d for d in m30k.downloads if not d.optional]
    assert len(required) == 6 and all(d.sha256 == m30k.sha256[d.target] for d in required)
    assert all("raw.githubusercontent.com/multi30k/dataset/" in d.url for d in m30k.downloads)


def test_get_spec_unknown() -> None:
    with pytest.raises(ValueError, match="dataset must be one of .* got 'mnist'"):
        get_spec("mnist")


def test_resolve_data_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_APPS_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("MOE_APPS_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root(None) == tmp_path / "home" / ".cache" / "moe-apps"


def test_status(ml100k_root: Path) -> None:
    assert dataset_status("movielens-100k", ml100k_root).startswith("complete: ")
    assert dataset_status("cifar10", ml100k_root).startswith("absent: ")
    (ml100k_root / "movielens/ml-100k/u2.base").unlink()
    status = dataset_status("movielens-100k", ml100k_root)
    assert status.startswith("incomplete: 1 files missing") and "u2.base" in status


def test_verify_fixture_fails_on_checksums_and_counts(ml100k_root: Path) -> None:
    report = verify_dataset("movielens-100k", ml100k_root)
    checks = {c.name: c for c in report.checks}
    assert not report.ok
    assert checks["files"].ok and checks["load"].ok
    assert not checks["sha256"].ok and "u.data" in checks["sha256"].detail
    assert not checks["counts"].ok and "ratings 8 (expected 100,000)" in checks["counts"].detail


def test_verify_without_checksums_and_counts(multi30k_root: Path) -> None:
    report = verify_dataset("multi30k", multi30k_root, checksums=False, counts=False)
    assert report.ok and [c.name for c in report.checks] == ["files", "load"]


def test_verify_reports_a_bad_file(multi30k_root: Path) -> None:
    (multi30k_root / "multi30k" / "val.de.gz").write_bytes(b"\x1f\x8b broken")
    report = verify_dataset("multi30k", multi30k_root, checksums=False)
    assert not report.ok
    assert report.checks[-1].name == "load" and "val.de.gz" in report.checks[-1].detail


def test_verify_missing(tmp_path: Path) -> None:
    report = verify_dataset("movielens-1m", tmp_path)
    assert not report.ok and report.checks[0].name == "files" and "3 missing" in (
        report.checks[0].detail)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["movielens-100k", "multi30k"])
def test_verify_shared_data(shared_data: Path, name: str) -> None:
    report = verify_dataset(name, shared_data)
    assert report.ok, report.checks
    assert [c.name for c in report.checks] == ["files", "sha256", "load", "counts"]


def test_every_exported_name_resolves() -> None:
    import moe_apps.datasets as package

    assert sorted(package.__all__) == sorted(package._WHERE)
    for name in package.__all__:
        module = importlib.import_module(f"moe_apps.datasets.{package._WHERE[name]}")
        assert getattr(package, name) is getattr(module, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018
